package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/billingd/billingd/stripefake"
)

// ChaosOptions describe a chaos run.
type ChaosOptions struct {
	// Billingd is the path of a billingd binary; when empty, cmd/billingd is built with the go
	// command (run from inside the module).
	Billingd string
	// Replicas is how many `billingd run` processes share the database.
	Replicas int
	// Workers is BILLING_MAX_WORKERS of each replica.
	Workers int
	// Charges is how many charges are enqueued, in waves over the first three quarters of
	// Duration (one wave a second).
	Charges int
	// DeclineShare is the share of charges on declining cards (half insufficient funds, soft;
	// the rest lost card or authentication required, hard).
	DeclineShare float64
	// Duration is how long replicas are killed and restarted.
	Duration time.Duration
	// KillEvery is the mean time between two kills (uniform in [KillEvery/2, 3*KillEvery/2]).
	KillEvery time.Duration
	// MaxKills stops the kills after this many (0: as many as fit in Duration).
	MaxKills int
	// Down is how long a killed replica stays down before it is started again.
	Down time.Duration
	// Fault500 and FaultDrop are the shares of PaymentIntent creates that stripefake answers
	// with a 500 after the work, or by dropping the connection after the work.
	Fault500, FaultDrop float64
	// Latency is added to every PaymentIntent create.
	Latency time.Duration
	// FakeRPS is stripefake's rate limit (429 rate_limit above it; 0: none); StripeRPS is
	// billingd's own limit across the replicas (BILLING_STRIPE_RPS).
	FakeRPS, StripeRPS float64
	// ReconcileAfter is BILLING_RECONCILE_AFTER (the reconcile schedule is @every 1s).
	ReconcileAfter time.Duration
	// SettleTimeout bounds the settle phase (faults off, every replica up).
	SettleTimeout time.Duration
	// Seed seeds the choices of cards, amounts, victims and faults.
	Seed uint64
	// Progress receives a line per event as the run goes; nil discards them.
	Progress io.Writer
}

// ChaosResult is what a chaos run found at the end.
type ChaosResult struct {
	Options ChaosOptions
	Kills   int
	// InFlightAtKills sums the attempts that were in flight (recorded, no outcome yet) at
	// each kill.
	InFlightAtKills int
	// Attempted is how many charges were enqueued.
	Attempted int
	// ByStatus counts the charges by final status.
	ByStatus map[string]int
	// Collected is succeeded plus recovered; Declined is retry_scheduled, recovering and
	// uncollectible.
	Collected, Declined int
	// Duplicated counts charges with more than one successful PaymentIntent at stripefake,
	// net of refunds. Must be 0.
	Duplicated int
	// Lost counts charges on working cards with no successful PaymentIntent that are not in a
	// retry or recovery state. Must be 0.
	Lost int
	// Unsettled counts charges neither final nor clearly scheduled when the settle phase ended.
	Unsettled int
	// Wrong counts charges whose status disagrees with stripefake: collected in the ledger but
	// not at stripefake, or the reverse, or collected on a card that must decline.
	Wrong int
	// Ledger is what billingd says it collected (succeeded and recovered charges), StripeNet
	// what stripefake kept (collected minus refunded), in cents.
	Ledger, StripeNet int64
	// ByJob, ByWebhook and ByReconcile count attempts by who settled them: the charge job
	// itself, a webhook, or the reconcile job. Retried counts attempts that took more than one
	// call (same idempotency key); TooMany attempts whose last call saw a 429.
	ByJob, ByWebhook, ByReconcile, Retried, TooMany int
	// Requests counts API requests at stripefake by kind.
	Requests map[string]int64
	// ChaosTime is the kill phase; SettleTime the settle phase.
	ChaosTime, SettleTime time.Duration
	// Examples names a few charges behind non-zero Duplicated, Lost, Wrong or Unsettled.
	Examples []string
}

// OK says whether the run proved exactly once: nothing duplicated, lost, wrong or unsettled,
// and the ledger equal to stripefake to the cent.
func (r ChaosResult) OK() bool {
	return r.Duplicated == 0 && r.Lost == 0 && r.Wrong == 0 && r.Unsettled == 0 && r.Ledger == r.StripeNet
}

// Report writes the result as a small table.
func (r ChaosResult) Report(w io.Writer) {
	verdict := "OK"
	if !r.OK() {
		verdict = "FAILED"
	}
	statuses := slices.Sorted(maps.Keys(r.ByStatus))
	var parts []string
	for _, s := range statuses {
		parts = append(parts, fmt.Sprintf("%s %d", s, r.ByStatus[s]))
	}
	fmt.Fprintf(w, "chaos: %d replicas, %d kills over %v (%d attempts in flight at the kills), settled in %v\n",
		r.Options.Replicas, r.Kills, r.ChaosTime.Round(time.Millisecond), r.InFlightAtKills, r.SettleTime.Round(time.Millisecond))
	fmt.Fprintf(w, "  charges attempted    %6d\n", r.Attempted)
	fmt.Fprintf(w, "  collected            %6d   (succeeded %d, recovered %d)\n", r.Collected, r.ByStatus["succeeded"], r.ByStatus["recovered"])
	fmt.Fprintf(w, "  declined/recovering  %6d   (retry_scheduled %d, recovering %d, uncollectible %d)\n", r.Declined,
		r.ByStatus["retry_scheduled"], r.ByStatus["recovering"], r.ByStatus["uncollectible"])
	fmt.Fprintf(w, "  duplicated           %6d   (must be 0)\n", r.Duplicated)
	fmt.Fprintf(w, "  lost                 %6d   (must be 0)\n", r.Lost)
	fmt.Fprintf(w, "  wrong / unsettled    %6d / %d (must be 0)\n", r.Wrong, r.Unsettled)
	fmt.Fprintf(w, "  ledger %d cents, stripefake net %d cents: %s\n", r.Ledger, r.StripeNet, map[bool]string{true: "equal", false: "DIFFERENT"}[r.Ledger == r.StripeNet])
	fmt.Fprintf(w, "  attempts settled by the job %d, by a webhook %d, by reconcile %d; retried with the same key %d; last call 429 %d\n",
		r.ByJob, r.ByWebhook, r.ByReconcile, r.Retried, r.TooMany)
	fmt.Fprintf(w, "  stripefake requests: PaymentIntent creates %d, retrieves %d, searches %d\n",
		r.Requests[stripefake.KindCreatePaymentIntent], r.Requests[stripefake.KindRetrievePaymentIntent], r.Requests[stripefake.KindSearchPaymentIntents])
	fmt.Fprintf(w, "  statuses: %s\n", strings.Join(parts, ", "))
	for _, ex := range r.Examples {
		fmt.Fprintf(w, "  ! %s\n", ex)
	}
	fmt.Fprintf(w, "  verdict: %s\n", verdict)
}

// replica is one `billingd run` process, started again on the same address after a kill.
type replica struct {
	n    int
	bin  string
	env  []string
	addr string
	log  string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

func (r *replica) start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	f, err := os.OpenFile(r.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(r.bin, "run")
	cmd.Env = r.env
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start replica %d: %w", r.n, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); f.Close(); close(done) }()
	r.cmd, r.done = cmd, done
	return nil
}

// kill sends SIGKILL (no soft stop, connections cut mid-request) and waits for the exit.
func (r *replica) kill() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// BuildBillingd builds cmd/billingd into dir with the go command and returns its path.
func BuildBillingd(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "billingd")
	out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/billingd/billingd/cmd/billingd").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build ./cmd/billingd (run from the module, or pass a binary): %v: %s", err, out)
	}
	return bin, nil
}

// expectation is what must become of a charge, from its card.
type expectation int

const (
	expectCollected expectation = iota
	expectSoft                  // insufficient funds: retry on the calendar
	expectHard                  // lost card, authentication required: recovery
)

// Chaos runs the chaos measurement: Replicas `billingd run` processes on one database, a
// stripefake served by this process with faults and its webhooks pointed at the first replica,
// charges enqueued in waves while replicas are killed with SIGKILL and started again; then the
// faults stop, every replica runs, and the run waits until every charge is final or clearly
// scheduled and compares the database with stripefake.
func Chaos(ctx context.Context, srv *Server, logger *slog.Logger, o ChaosOptions) (ChaosResult, error) {
	res := ChaosResult{Options: o}
	progress := o.Progress
	if progress == nil {
		progress = io.Discard
	}
	say := func(format string, args ...any) { fmt.Fprintf(progress, format+"\n", args...) }
	rng := rand.New(rand.NewPCG(o.Seed, o.Seed+1))

	tmp, err := os.MkdirTemp("", "billingbench-chaos-")
	if err != nil {
		return res, err
	}
	keepLogs := false
	defer func() {
		if keepLogs {
			say("replica logs kept in %s", tmp)
			return
		}
		os.RemoveAll(tmp)
	}()
	bin := o.Billingd
	if bin == "" {
		say("building cmd/billingd")
		if bin, err = BuildBillingd(ctx, tmp); err != nil {
			return res, err
		}
	}

	addrs := make([]string, o.Replicas)
	for i := range addrs {
		if addrs[i], err = freeAddr(); err != nil {
			return res, err
		}
	}
	e, err := NewEnv(ctx, srv, logger, EnvOptions{
		NoRiver: true,
		Fake: []stripefake.Option{
			stripefake.WithWebhook("http://"+addrs[0]+"/webhooks/stripe", webhookSecret),
			stripefake.WithSeed(o.Seed),
		},
	})
	if err != nil {
		return res, err
	}
	defer e.Close()

	// Customers: 50 on working cards shared by most charges; one per declining charge, so that
	// the card networks' limit does not mix in.
	good := make([]Customer, 50)
	for i := range good {
		if good[i], err = e.NewCustomer(ctx, "good-"+strconv.Itoa(i), "pm_card_visa"); err != nil {
			return res, err
		}
	}
	cs := make([]Customer, o.Charges)
	amounts := make([]int64, o.Charges)
	expect := make([]expectation, o.Charges)
	for i := range cs {
		amounts[i] = 100 + rng.Int64N(99_900)
		if rng.Float64() >= o.DeclineShare {
			cs[i] = good[rng.IntN(len(good))]
			continue
		}
		card, x := "pm_card_chargeDeclinedInsufficientFunds", expectSoft
		switch r := rng.IntN(10); {
		case r >= 8:
			card, x = "pm_card_authenticationRequired", expectHard
		case r >= 5:
			card, x = "pm_card_chargeDeclinedLostCard", expectHard
		}
		expect[i] = x
		if cs[i], err = e.NewCustomer(ctx, "declining-"+strconv.Itoa(i), card); err != nil {
			return res, err
		}
	}
	say("%d customers created, %d charges to enqueue (%d on declining cards)", len(good)+countNot(expect, expectCollected), o.Charges, countNot(expect, expectCollected))

	// Faults, from now on.
	if o.Fault500 > 0 {
		e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Kind: stripefake.Fault500After}, o.Fault500)
	}
	if o.FaultDrop > 0 {
		e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Kind: stripefake.FaultDropAfter}, o.FaultDrop)
	}
	if o.Latency > 0 {
		e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Latency: o.Latency}, 1)
	}
	if o.FakeRPS > 0 {
		e.Fake.SetRateLimit(o.FakeRPS, 0)
	}

	replicas := make([]*replica, o.Replicas)
	base := append(os.Environ(),
		"DATABASE_URL="+e.DBURL,
		"STRIPE_SECRET_KEY="+secretKey,
		"STRIPE_WEBHOOK_SECRET="+webhookSecret,
		"STRIPE_API_BASE="+e.FakeURL,
		"BILLING_MAX_WORKERS="+strconv.Itoa(o.Workers),
		"BILLING_FETCH_COOLDOWN=5ms",
		"BILLING_STRIPE_RPS="+strconv.FormatFloat(o.StripeRPS, 'f', -1, 64),
		"BILLING_CHARGE_BACKOFF=50ms",
		"BILLING_RECONCILE_SCHEDULE=@every 1s",
		"BILLING_RECONCILE_AFTER="+o.ReconcileAfter.String(),
		"BILLING_RECOVERY_SCHEDULE=@every 1s",
		"BILLING_SOFT_STOP_TIMEOUT=5s",
		"BILLING_LOG_LEVEL=warn",
	)
	for i := range replicas {
		replicas[i] = &replica{n: i, bin: bin, addr: addrs[i], log: filepath.Join(tmp, fmt.Sprintf("replica-%d.log", i)),
			env: append(slices.Clip(base), "BILLING_HTTP_ADDR="+addrs[i], "BILLING_PUBLIC_URL=http://"+addrs[i])}
		if err := replicas[i].start(); err != nil {
			return res, err
		}
	}
	defer func() {
		for _, r := range replicas {
			r.kill()
		}
	}()
	say("%d replicas started (webhooks to replica 0 at %s)", o.Replicas, addrs[0])

	// Charges in waves, one a second, over the first three quarters of the kill phase.
	waves := max(1, int(o.Duration*3/4/time.Second))
	per := (o.Charges + waves - 1) / waves
	var ids []int64
	expectByID := map[int64]expectation{}
	var idsMu sync.Mutex
	enqueueErr := make(chan error, 1)
	chaosStart := time.Now()
	go func() {
		defer close(enqueueErr)
		for i, w := 0, 0; i < o.Charges; i, w = i+per, w+1 {
			if d := time.Until(chaosStart.Add(time.Duration(w) * time.Second)); d > 0 {
				time.Sleep(d)
			}
			j := min(i+per, o.Charges)
			got, err := e.Charges(ctx, cs[i:j], amounts[i:j], "usd")
			if err != nil {
				enqueueErr <- err
				return
			}
			idsMu.Lock()
			for k, id := range got {
				expectByID[id] = expect[i+k]
			}
			ids = append(ids, got...)
			idsMu.Unlock()
		}
	}()

	deadline := chaosStart.Add(o.Duration)
	for o.MaxKills == 0 || res.Kills < o.MaxKills {
		wait := o.KillEvery/2 + time.Duration(rng.Int64N(int64(o.KillEvery)+1))
		if time.Now().Add(wait).After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(wait):
		}
		victim := replicas[rng.IntN(len(replicas))]
		var inFlight int
		if err := e.Pool.QueryRow(ctx, `select count(*) from billing.charge_attempts where outcome = 'in_flight'`).Scan(&inFlight); err != nil {
			return res, err
		}
		victim.kill()
		res.Kills++
		res.InFlightAtKills += inFlight
		counts, err := statusCounts(ctx, e)
		if err != nil {
			return res, err
		}
		say("%6.1fs  kill -9 replica %d (%d attempts in flight); charges %s", time.Since(chaosStart).Seconds(), victim.n, inFlight, counts)
		time.Sleep(o.Down)
		if err := victim.start(); err != nil {
			return res, err
		}
	}
	if err := <-enqueueErr; err != nil {
		return res, fmt.Errorf("enqueue charges: %w", err)
	}
	if d := time.Until(deadline); d > 0 && o.MaxKills == 0 {
		time.Sleep(d)
	}
	res.ChaosTime = time.Since(chaosStart)
	res.Attempted = len(ids)

	// Settle: faults off, every replica up, reconcile every second.
	e.Fake.ClearFaults()
	e.Fake.SetRateLimit(0, 0)
	counts, err := statusCounts(ctx, e)
	if err != nil {
		return res, err
	}
	say("%6.1fs  kills over, faults off; settling; charges %s", time.Since(chaosStart).Seconds(), counts)
	settleStart := time.Now()
	settleCtx, cancelTicker := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-settleCtx.Done():
				return
			case <-t.C:
				if c, err := statusCounts(settleCtx, e); err == nil {
					say("%6.1fs  settling; charges %s", time.Since(chaosStart).Seconds(), c)
				}
			}
		}
	}()
	states, err := e.WaitSettled(ctx, ids, o.SettleTimeout)
	cancelTicker()
	res.SettleTime = time.Since(settleStart)
	if err != nil && !errors.Is(err, ErrNotSettled) {
		return res, err
	}
	// A last moment for webhooks and sweeps in flight, then stop the replicas so that nothing
	// changes while the end state is read.
	for _, r := range replicas {
		r.kill()
	}
	counts, _ = statusCounts(ctx, e)
	say("%6.1fs  settled; replicas stopped; charges %s", time.Since(chaosStart).Seconds(), counts)
	if states, err = e.ChargeStates(ctx, ids); err != nil {
		return res, err
	}
	if err := check(ctx, e, &res, states, expectByID); err != nil {
		return res, err
	}
	keepLogs = !res.OK()
	return res, nil
}

func countNot(xs []expectation, x expectation) int {
	n := 0
	for _, v := range xs {
		if v != x {
			n++
		}
	}
	return n
}

// statusCounts summarises the charges by status, for progress lines.
func statusCounts(ctx context.Context, e *Env) (string, error) {
	rows, err := e.Pool.Query(ctx, `select status, count(*) from billing.charges group by status order by status`)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var parts []string
	for rows.Next() {
		var s string
		var n int
		if err := rows.Scan(&s, &n); err != nil {
			return "", err
		}
		parts = append(parts, s+" "+strconv.Itoa(n))
	}
	if len(parts) == 0 {
		return "none yet", rows.Err()
	}
	return strings.Join(parts, ", "), rows.Err()
}

const attemptCountsQuery = `
select count(*) filter (where settled_by = 'job'), count(*) filter (where settled_by = 'webhook'),
       count(*) filter (where settled_by = 'reconcile'), count(*) filter (where tries > 1),
       count(*) filter (where http_status = 429)
  from billing.charge_attempts`

// check compares the end state of the database with stripefake.
func check(ctx context.Context, e *Env, res *ChaosResult, states map[int64]ChargeState, expect map[int64]expectation) error {
	collected := map[string]int{} // successful PaymentIntents, net of refunds, per charge_id
	for _, pi := range e.Fake.PaymentIntents() {
		if pi.Status == "succeeded" && pi.AmountReceived > pi.AmountRefunded {
			collected[pi.Metadata[stripefake.MetadataChargeID]]++
		}
	}
	res.StripeNet = e.Fake.Totals()["usd"].Net()
	res.ByStatus = map[string]int{}
	example := func(format string, args ...any) {
		if len(res.Examples) < 10 {
			res.Examples = append(res.Examples, fmt.Sprintf(format, args...))
		}
	}
	now := time.Now()
	ids := slices.Sorted(maps.Keys(states))
	for _, id := range ids {
		s := states[id]
		key := strconv.FormatInt(id, 10)
		n := collected[key]
		res.ByStatus[s.Status]++
		inLedger := s.Status == "succeeded" || s.Status == "recovered"
		switch s.Status {
		case "succeeded", "recovered":
			res.Collected++
			res.Ledger += s.Amount
		case "retry_scheduled", "recovering", "uncollectible":
			res.Declined++
		}
		if n > 1 {
			res.Duplicated++
			example("charge %d: %d successful PaymentIntents (duplicated)", id, n)
		}
		if !s.Settled(now) {
			res.Unsettled++
			example("charge %d: %s (%s), not settled", id, s.Status, s.Reason)
		}
		switch {
		case expect[id] == expectCollected && n == 0 && s.Status != "retry_scheduled" && s.Status != "recovering":
			res.Lost++
			example("charge %d: %s (%s), on a working card, not collected (lost)", id, s.Status, s.Reason)
		case inLedger != (n > 0):
			res.Wrong++
			example("charge %d: %s in the ledger, %d successful PaymentIntents at stripefake", id, s.Status, n)
		case expect[id] != expectCollected && n > 0:
			res.Wrong++
			example("charge %d: collected on a card that declines", id)
		}
	}
	for key := range collected {
		id, err := strconv.ParseInt(key, 10, 64)
		if _, ok := states[id]; err != nil || !ok {
			res.Wrong++
			example("a successful PaymentIntent for unknown charge %q", key)
		}
	}
	if err := e.Pool.QueryRow(ctx, attemptCountsQuery).Scan(&res.ByJob, &res.ByWebhook, &res.ByReconcile, &res.Retried, &res.TooMany); err != nil {
		return err
	}
	var open int
	if err := e.Pool.QueryRow(ctx, `select count(*) from billing.charge_attempts where outcome in ('in_flight', 'unknown')`).Scan(&open); err != nil {
		return err
	}
	if open > 0 {
		res.Unsettled += open
		example("%d attempts left without an outcome", open)
	}
	res.Requests = e.Fake.RequestCounts()
	return nil
}
