package jobs_test

import (
	"context"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/stripefake"
)

// sized reads a stress test's size from the environment variable name: def by default, or
// defRace under the race detector (several times slower; the suite stays under a minute on
// a shared two-core machine).
func sized(t testing.TB, name string, def, defRace int) int {
	t.Helper()
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, name)
		return n
	}
	if raceEnabled {
		return defRace
	}
	return def
}

// population is a set of charges and what must become of each.
type population struct {
	ids    []int64
	expect map[int64]string // succeeded | soft (retry on the calendar) | hard (recovery)
}

// makePopulation creates customers and n ad-hoc charges: most on working cards, some on cards
// that decline softly (insufficient funds) or hard (lost card, authentication required). Each
// declining customer has one charge, so that the card-network limit does not mix in.
func (e *env) makePopulation(n int, seed uint64) population {
	e.t.Helper()
	rng := rand.New(rand.NewPCG(seed, seed+1))
	good := make([]dbtest.Customer, 50)
	for i := range good {
		good[i] = e.customer("good-"+strconv.Itoa(i), []string{"pm_card_visa", "pm_card_mastercard", "pm_card_amex"}[i%3])
	}
	p := population{expect: map[int64]string{}}
	var cs []dbtest.Customer
	var amounts []int64
	var kinds []string
	for i := range n {
		amount := 100 + rng.Int64N(99_900)
		switch r := rng.IntN(100); {
		case r < 5:
			cs = append(cs, e.customer("soft-"+strconv.Itoa(i), "pm_card_chargeDeclinedInsufficientFunds"))
			kinds = append(kinds, "soft")
		case r < 8:
			cs = append(cs, e.customer("lost-"+strconv.Itoa(i), "pm_card_chargeDeclinedLostCard"))
			kinds = append(kinds, "hard")
		case r < 10:
			cs = append(cs, e.customer("auth-"+strconv.Itoa(i), "pm_card_authenticationRequired"))
			kinds = append(kinds, "hard")
		default:
			cs = append(cs, good[rng.IntN(len(good))])
			kinds = append(kinds, "succeeded")
		}
		amounts = append(amounts, amount)
	}
	const batch = 500
	for i := 0; i < n; i += batch {
		j := min(i+batch, n)
		ids := e.charges(cs[i:j], amounts[i:j], "usd")
		for k, id := range ids {
			p.expect[id] = kinds[i+k]
		}
		p.ids = append(p.ids, ids...)
	}
	return p
}

// injectFaults makes stripefake misbehave: 5% 500 after the work, 5% dropped connections after
// the work, 3% 429 (from the front, as Stripe's rate limiter answers) and latency.
func (e *env) injectFaults() {
	e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Kind: stripefake.Fault500After}, 0.05)
	e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Kind: stripefake.FaultDropAfter}, 0.05)
	e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Latency: 20 * time.Millisecond}, 0.3)
	e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Latency: 100 * time.Millisecond}, 0.02)
	e.Fake.SetFaultRate(stripefake.KindSearchPaymentIntents, stripefake.Fault{Latency: 20 * time.Millisecond}, 0.5)
	e.Front.set429(0.03)
}

// checkExactlyOnce asserts the end state of a population: every charge final or clearly
// scheduled, one successful PaymentIntent for each that should succeed and none for the others,
// one PaymentIntent per charge at all (no attempt was sent twice under different keys), no
// attempt left open, and the ledger equal to what Stripe collected, to the cent.
func (e *env) checkExactlyOnce(p population, states map[int64]chargeState) {
	t := e.t
	t.Helper()
	ctx := context.Background()
	successes := e.Fake.SuccessfulChargesByChargeID()
	var ledger int64
	counts := map[string]int{}
	for _, id := range p.ids {
		st := states[id]
		counts[p.expect[id]+"->"+st.Status]++
		switch p.expect[id] {
		case "succeeded":
			require.Equal(t, "succeeded", st.Status, "charge %d: %s", id, st.Reason)
			require.Equal(t, 1, successes[itoa(id)], "charge %d: exactly one successful PaymentIntent", id)
			ledger += st.Amount
		case "soft":
			require.Equal(t, "retry_scheduled", st.Status, "charge %d: %s", id, st.Reason)
			require.NotNil(t, st.NextAttemptAt)
			require.Zero(t, successes[itoa(id)], "charge %d", id)
		case "hard":
			require.Equal(t, "recovering", st.Status, "charge %d: %s", id, st.Reason)
			require.Zero(t, successes[itoa(id)], "charge %d", id)
		}
	}
	for chargeID := range successes {
		id, err := strconv.ParseInt(chargeID, 10, 64)
		require.NoError(t, err)
		require.Equal(t, "succeeded", p.expect[id], "a successful PaymentIntent for charge %s that must not succeed", chargeID)
	}
	perCharge := map[string]int{}
	for _, pi := range e.Fake.PaymentIntents() {
		perCharge[pi.Metadata["charge_id"]]++
	}
	for _, id := range p.ids {
		require.Equal(t, 1, perCharge[itoa(id)], "charge %d: one PaymentIntent, one attempt", id)
	}
	var open, dbLedger int64
	require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from billing.charge_attempts where outcome in ('in_flight', 'unknown')`).Scan(&open))
	require.Zero(t, open, "no attempt left without an outcome")
	require.NoError(t, e.Pool.QueryRow(ctx, `select coalesce(sum(amount), 0) from billing.charges where status = 'succeeded'`).Scan(&dbLedger))
	require.Equal(t, ledger, dbLedger)
	require.Equal(t, dbLedger, e.Fake.Totals()["usd"].Collected, "the ledger equals what Stripe collected, to the cent")
	t.Logf("outcomes: %v; ledger %d cents", counts, dbLedger)
}

// 2,000 charges (600 under -race; BILLINGD_FAULT_CHARGES sets it) through faults: 500s after the work, dropped connections after the work, 429s
// and latency. Each charge that should succeed is collected exactly once, the others never.
func TestChargeExactlyOnceUnderFaults(t *testing.T) {
	t.Parallel()
	n := sized(t, "BILLINGD_FAULT_CHARGES", 2000, 600)
	e := newEnv(t, envOpts{Flags: []string{"-max-workers", "40"}, PoolConns: 50})
	p := e.makePopulation(n, 42)
	e.injectFaults()
	start := time.Now()
	e.start()
	states := e.waitSettled(p.ids, 90*time.Second)
	t.Logf("%d charges settled in %v", n, time.Since(start).Round(time.Millisecond))
	if testing.Verbose() {
		e.logTimeline(start)
	}
	e.checkExactlyOnce(p, states)

	// The faults did happen and were handled the ways they should be.
	ctx := context.Background()
	var byReconcile, retried int
	require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from billing.charge_attempts where settled_by = 'reconcile'`).Scan(&byReconcile))
	require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from billing.charge_attempts where tries > 1`).Scan(&retried))
	require.Positive(t, byReconcile, "500s after the work are settled by reconcile")
	require.Positive(t, retried, "429s are retried with the same key")
	require.Positive(t, e.Front.tooMany.Load())
	t.Logf("settled by reconcile: %d, retried with the same key: %d, 429s: %d, requests: %v",
		byReconcile, retried, e.Front.tooMany.Load(), e.Fake.RequestCounts())
}

// logTimeline logs how many charges settled in each second after start.
func (e *env) logTimeline(start time.Time) {
	rows, err := e.Pool.Query(context.Background(), `
		select floor(extract(epoch from c.status_changed_at - $1))::int, count(*)
		from billing.charges c group by 1 order by 1`, start)
	require.NoError(e.t, err)
	var line []string
	for rows.Next() {
		var sec, n int
		require.NoError(e.t, rows.Scan(&sec, &n))
		line = append(line, strconv.Itoa(sec)+"s:"+strconv.Itoa(n))
	}
	require.NoError(e.t, rows.Err())
	e.t.Logf("settled per second: %v", line)
}
