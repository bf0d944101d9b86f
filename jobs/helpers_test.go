package jobs_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"sync/atomic"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/stripefake"
	"github.com/billingd/billingd/worker"
)

// ---- a real SMTP server, in the test process ----

// mailbox is an SMTP server (github.com/emersion/go-smtp) that accepts mail for anyone after
// AUTH PLAIN with its user and password, and keeps what it receives.
type mailbox struct {
	Addr     string
	user     string
	pass     string
	mu       sync.Mutex
	messages []receivedMail
	arrived  chan struct{}
}

type receivedMail struct {
	From string
	To   []string
	Data string
}

func newMailbox(t *testing.T) *mailbox {
	t.Helper()
	mb := &mailbox{user: "billingd", pass: "s3cret-smtp", arrived: make(chan struct{}, 100)}
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) {
		return &smtpSession{mb: mb}, nil
	}))
	srv.Domain = "localhost"
	srv.AllowInsecureAuth = true // plain text on loopback, as the client is told (starttls=off)
	srv.ReadTimeout = 10 * time.Second
	srv.WriteTimeout = 10 * time.Second
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	mb.Addr = ln.Addr().String()
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return mb
}

// URL is the BILLING_SMTP_URL of the server.
func (mb *mailbox) URL() string {
	return "smtp://" + mb.user + ":" + mb.pass + "@" + mb.Addr + "?starttls=off"
}

func (mb *mailbox) setPassword(p string) {
	mb.mu.Lock()
	defer mb.mu.Unlock()
	mb.pass = p
}

func (mb *mailbox) Messages() []receivedMail {
	mb.mu.Lock()
	defer mb.mu.Unlock()
	return append([]receivedMail(nil), mb.messages...)
}

type smtpSession struct {
	mb     *mailbox
	authed bool
	from   string
	to     []string
}

func (s *smtpSession) AuthMechanisms() []string { return []string{sasl.Plain} }

func (s *smtpSession) Auth(string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(_, user, pass string) error {
		s.mb.mu.Lock()
		ok := user == s.mb.user && pass == s.mb.pass
		s.mb.mu.Unlock()
		if !ok {
			return errors.New("invalid credentials")
		}
		s.authed = true
		return nil
	}), nil
}

func (s *smtpSession) Mail(from string, _ *smtp.MailOptions) error {
	if !s.authed {
		return smtp.ErrAuthRequired
	}
	s.from = from
	return nil
}

func (s *smtpSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.to = append(s.to, to)
	return nil
}

func (s *smtpSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.mb.mu.Lock()
	s.mb.messages = append(s.mb.messages, receivedMail{From: s.from, To: s.to, Data: string(b)})
	s.mb.mu.Unlock()
	s.mb.arrived <- struct{}{}
	return nil
}

func (s *smtpSession) Reset()        { s.from, s.to = "", nil }
func (s *smtpSession) Logout() error { return nil }

// ---- the host application, receiving signed POSTs ----

// appReceiver is the host application's endpoint. It verifies each POST's signature the way the
// README tells applications to (its own code, not billingd's), and answers with the statuses
// queued in fail before answering 204.
type appReceiver struct {
	URL    string
	secret string
	mu     sync.Mutex
	fail   []int
	posts  []receivedPost
	bad    []string // why a POST was rejected
}

type receivedPost struct {
	Body           []byte
	NotificationID string
}

func newAppReceiver(t *testing.T, secret string) *appReceiver {
	t.Helper()
	a := &appReceiver{secret: secret}
	srv := httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(srv.Close)
	a.URL = srv.URL + "/billing-events"
	return a
}

func (a *appReceiver) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := verifyAsApplication(a.secret, r.Header.Get("Billingd-Signature"), body, time.Now()); err != nil {
		a.bad = append(a.bad, err.Error())
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	if len(a.fail) > 0 {
		status := a.fail[0]
		a.fail = a.fail[1:]
		http.Error(w, "try later", status)
		return
	}
	a.posts = append(a.posts, receivedPost{Body: body, NotificationID: r.Header.Get("Billingd-Notification-Id")})
	w.WriteHeader(http.StatusNoContent)
}

func (a *appReceiver) failNext(statuses ...int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.fail = append(a.fail, statuses...)
}

func (a *appReceiver) Posts() []receivedPost {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]receivedPost(nil), a.posts...)
}

func (a *appReceiver) Rejected() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.bad...)
}

// verifyAsApplication is the README's recipe, written independently of billingd's code: split
// "t=...,v1=...", recompute HMAC-SHA256(secret, t + "." + body), compare in constant time,
// refuse timestamps more than five minutes away.
func verifyAsApplication(secret, header string, body []byte, now time.Time) error {
	var ts, sig string
	for _, kv := range strings.Split(header, ",") {
		switch {
		case strings.HasPrefix(kv, "t="):
			ts = kv[2:]
		case strings.HasPrefix(kv, "v1="):
			sig = kv[3:]
		}
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || sig == "" {
		return errors.New("malformed signature header")
	}
	if now.Sub(time.Unix(sec, 0)).Abs() > 5*time.Minute {
		return errors.New("stale timestamp")
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts + "." + string(body)))
	got, err := hex.DecodeString(sig)
	if err != nil || !hmac.Equal(got, mac.Sum(nil)) {
		return errors.New("signature mismatch")
	}
	return nil
}

// ---- the daemon's job client ----

// bundle is what a test of the recovery flow works with.
type bundle struct {
	pool    *pgxpool.Pool
	cfg     *config.Config
	deps    *jobs.Deps
	client  *river.Client[pgx.Tx]
	events  <-chan *river.Event
	backlog []*river.Event // events received but not yet waited for
	mailbox *mailbox
	app     *appReceiver
	logs    *lockedWriter
	fake    *stripefake.Server
	stripe  *stripe.Client

	// hooks is the daemon's webhook handler, set once the River client exists.
	hooks atomic.Pointer[worker.Webhooks]
}

const notifySecret = "whsec-app-test-secret"

// testConfig returns the defaults of `billingd run` with the test's URLs.
func testConfig(t *testing.T) *config.Config {
	t.Helper()
	cfg := &config.Config{}
	fs := config.NewFlagSet("run", cfg, func(string) string { return "" })
	require.NoError(t, fs.Parse(nil))
	cfg.PublicURL = "https://billing.example.test"
	cfg.FetchCooldown = 5 * time.Millisecond
	cfg.SoftStopTimeout = 5 * time.Second
	cfg.EmailFrom = "Example Billing <billing@example.test>"
	return cfg
}

// setup starts a River client built by worker.NewRiverClient (what production runs) on a fresh
// database, with an SMTP server and an application receiver configured. edit may change the
// configuration before the client is built.
func setup(t *testing.T, edit func(*config.Config)) *bundle {
	t.Helper()
	b := &bundle{pool: dbtest.NewPool(t), cfg: testConfig(t), mailbox: newMailbox(t), logs: &lockedWriter{w: &bytes.Buffer{}}}
	b.app = newAppReceiver(t, notifySecret)
	hook := httptest.NewServer(http.HandlerFunc(b.webhooks))
	t.Cleanup(hook.Close)
	// The endpoint is enabled for the Checkout events that recovery needs, as a Stripe webhook
	// endpoint is configured with its enabled_events.
	b.fake = stripefake.New(stripefake.WithWebhook(hook.URL, stripeWebhookSecret),
		stripefake.WithWebhookEvents("checkout.session.completed", "checkout.session.expired"))
	t.Cleanup(b.fake.Close)
	fakeSrv := httptest.NewServer(b.fake)
	t.Cleanup(fakeSrv.Close)
	b.stripe = stripeapi.NewClient("sk_test_recovery", fakeSrv.URL, nil, 2)
	b.cfg.SMTPURL = b.mailbox.URL()
	b.cfg.NotifyURL = b.app.URL
	b.cfg.NotifySecret = notifySecret
	if edit != nil {
		edit(b.cfg)
	}
	logger := slog.New(slog.NewTextHandler(b.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	b.deps = &jobs.Deps{Pool: b.pool, Stripe: b.stripe, Logger: logger, Config: b.cfg}
	client, err := worker.NewRiverClient(b.pool, b.cfg, b.deps)
	require.NoError(t, err)
	b.client = client
	b.hooks.Store(worker.NewWebhooks(b.pool, client, stripeWebhookSecret, logger))
	events, cancel := client.Subscribe(river.EventKindJobCompleted, river.EventKindJobCancelled,
		river.EventKindJobFailed, river.EventKindJobSnoozed)
	t.Cleanup(cancel)
	b.events = events
	ctx := context.Background()
	require.NoError(t, client.Start(ctx))
	t.Cleanup(func() {
		stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = client.Stop(stopCtx)
	})
	return b
}

// lockedWriter collects the daemon's log lines for assertions about what they never contain.
type lockedWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.String()
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// waitJob waits for the next event of a job of kind that matches, and returns it. Events that
// do not match are kept, in order, for later calls.
func (b *bundle) waitJob(t *testing.T, kind string, match func(*river.Event) bool) *river.Event {
	t.Helper()
	ok := func(ev *river.Event) bool { return ev.Job.Kind == kind && (match == nil || match(ev)) }
	for i, ev := range b.backlog {
		if ok(ev) {
			b.backlog = append(b.backlog[:i:i], b.backlog[i+1:]...)
			return ev
		}
	}
	timeout := time.After(20 * time.Second)
	for {
		select {
		case ev := <-b.events:
			if ok(ev) {
				return ev
			}
			b.backlog = append(b.backlog, ev)
		case <-timeout:
			t.Fatalf("no %s job event within 20s", kind)
			return nil
		}
	}
}

// waitDone waits until the job with id is finalized or snoozed, and returns its event.
func (b *bundle) waitDone(t *testing.T, kind string, id int64) *river.Event {
	t.Helper()
	return b.waitJob(t, kind, func(ev *river.Event) bool { return ev.Job.ID == id })
}

// jobsOf returns the River jobs of kind, oldest first.
func jobsOf(t *testing.T, pool *pgxpool.Pool, kind string) []*rivertype.JobRow {
	t.Helper()
	rows, err := pool.Query(context.Background(),
		`select id, args, state::text, attempt from river_job where kind = $1 order by id`, kind)
	require.NoError(t, err)
	defer rows.Close()
	var out []*rivertype.JobRow
	for rows.Next() {
		j := &rivertype.JobRow{Kind: kind}
		var state string
		require.NoError(t, rows.Scan(&j.ID, &j.EncodedArgs, &state, &j.Attempt))
		j.State = rivertype.JobState(state)
		out = append(out, j)
	}
	require.NoError(t, rows.Err())
	return out
}

// ---- fixtures ----

// newCharge inserts a charge of the customer in status, as the charge job leaves it.
func newCharge(t *testing.T, pool *pgxpool.Pool, customerID, amount int64, currency, description, status string) int64 {
	t.Helper()
	var id int64
	err := pool.QueryRow(context.Background(), `
		insert into billing.charges (customer_id, source, amount, currency, description, status, requested_by, next_attempt_at)
		values ($1, 'adhoc', $2, $3, $4, $5, 'test', case when $5 = 'retry_scheduled' then now() + interval '1 day' end)
		returning id`, customerID, amount, currency, description, status).Scan(&id)
	require.NoError(t, err)
	return id
}

// openRecovery opens a recovery for the charge as StartRecoveryTx does, but without its
// notify_recovery job (for tests of what comes after it), and returns the token.
func openRecovery(t *testing.T, pool *pgxpool.Pool, chargeID int64) string {
	t.Helper()
	token := rand.Text() + rand.Text()[:17] // 43 characters of base32, a valid token shape
	_, err := pool.Exec(context.Background(), `
		insert into billing.recoveries (charge_id, token, reason) values ($1, $2, 'card_declined')`, chargeID, token)
	require.NoError(t, err)
	return token
}

func scalar[T any](t *testing.T, pool *pgxpool.Pool, sql string, args ...any) T {
	t.Helper()
	var v T
	require.NoError(t, pool.QueryRow(context.Background(), sql, args...).Scan(&v))
	return v
}

// requireEvent checks the kind of a job event, showing the job's errors when it differs.
func requireEvent(t *testing.T, want river.EventKind, ev *river.Event) {
	t.Helper()
	if ev.Kind != want {
		var errs []string
		for _, e := range ev.Job.Errors {
			errs = append(errs, e.Error)
		}
		t.Fatalf("job %s %d: got %s, want %s; errors: %v", ev.Job.Kind, ev.Job.ID, ev.Kind, want, errs)
	}
}

// ---- Stripe: the emulator, and a stand-in for the webhooks branch ----

const stripeWebhookSecret = "whsec_recovery_test"

// webhooks serves /webhooks/stripe as the daemon does (worker.NewWebhooks), once the River
// client exists.
func (b *bundle) webhooks(w http.ResponseWriter, r *http.Request) {
	h := b.hooks.Load()
	if h == nil {
		http.Error(w, "starting", http.StatusServiceUnavailable)
		return
	}
	h.ServeHTTP(w, r)
}

// requireEventsProcessed checks that every Stripe event billingd received was processed.
func (b *bundle) requireEventsProcessed(t *testing.T) {
	t.Helper()
	require.NoError(t, b.fake.WaitForDeliveries(t.Context()))
	require.Eventually(t, func() bool {
		return scalar[int](t, b.pool, `select count(*) from billing.webhook_events where status <> 'processed'`) == 0
	}, 20*time.Second, 20*time.Millisecond, "every event processed")
}

// stripeCustomer creates the customer at stripefake with a saved card made from testPM (a
// declining one, for charges that go to recovery), and in billing.
func (b *bundle) stripeCustomer(t *testing.T, ref, testPM string) dbtest.Customer {
	t.Helper()
	installation, err := b.deps.Installation(t.Context())
	require.NoError(t, err)
	cus, err := b.stripe.V1Customers.Create(t.Context(), stripeapi.CustomerCreate(installation, ref, ref+"@example.com"))
	require.NoError(t, err)
	pm, err := b.fake.AttachTestCard(cus.ID, testPM)
	require.NoError(t, err)
	return dbtest.NewCustomer(t, b.pool, dbtest.CustomerOpts{Ref: ref, StripeCustomerID: cus.ID, PaymentMethodID: pm})
}

// decline plays the charge job's attempt that ends in a 402 (issue 5 owns the real one): an
// off-session PaymentIntent on the customer's saved card, declined by Stripe, then the
// transaction that records it (the charge becomes recovering) and starts recovery with
// StartRecoveryTx. It returns the notify_recovery job's id.
func (b *bundle) decline(t *testing.T, cust dbtest.Customer, chargeID int64) int64 {
	return b.declineTo(t, cust, chargeID, "recovering")
}

// declineTo is decline with the charge's next status: recovering, or retry_scheduled (a soft
// decline that is also retried automatically).
func (b *bundle) declineTo(t *testing.T, cust dbtest.Customer, chargeID int64, status string) int64 {
	t.Helper()
	ctx := t.Context()
	var amount int64
	var currency, description, pm string
	require.NoError(t, b.pool.QueryRow(ctx, `
		select c.amount, c.currency, c.description, pm.stripe_payment_method_id
		from billing.charges c join billing.payment_methods pm on pm.id = $2 where c.id = $1`,
		chargeID, cust.PaymentMethodID).Scan(&amount, &currency, &description, &pm))
	_, err := b.stripe.V1PaymentIntents.Create(ctx, stripeapi.OffSessionPaymentIntent(cust.StripeID, pm, amount, currency,
		description, map[string]string{stripeapi.MetadataChargeID: strconv.FormatInt(chargeID, 10)},
		"test-charge-"+strconv.FormatInt(chargeID, 10)+"-attempt-1"))
	var serr *stripe.Error
	require.ErrorAs(t, err, &serr)
	require.Equal(t, http.StatusPaymentRequired, serr.HTTPStatusCode, serr.Msg)

	tx, err := b.pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	_, err = tx.Exec(ctx, `update billing.charges set status = $3, status_reason = $2,
		next_attempt_at = case when $3 = 'retry_scheduled' then now() + interval '1 day' end where id = $1`,
		chargeID, string(serr.DeclineCode), status)
	require.NoError(t, err)
	opened, err := jobs.StartRecoveryTx(ctx, tx, b.client, chargeID, string(serr.DeclineCode))
	require.NoError(t, err)
	require.True(t, opened)
	require.NoError(t, tx.Commit(ctx))
	jobs := jobsOf(t, b.pool, "notify_recovery")
	return jobs[len(jobs)-1].ID
}

// The automatic retry of a charge, as the charge job (issue 5) does it, in three steps so that a
// test can interleave the customer's payment between them.

// startAttempt moves a due charge to processing under lock, as the charge job does before it
// calls Stripe. It reports false when the charge is no longer due (paid, canceled).
func (b *bundle) startAttempt(t *testing.T, chargeID int64) bool {
	t.Helper()
	tag, err := b.pool.Exec(t.Context(), `update billing.charges set status = 'processing', next_attempt_at = null
		where id = $1 and status = 'retry_scheduled'`, chargeID)
	require.NoError(t, err)
	return tag.RowsAffected() == 1
}

// collect charges the customer's card off-session at stripefake (the card now works: testPM is
// attached for it) and returns the succeeded PaymentIntent.
func (b *bundle) collect(t *testing.T, cust dbtest.Customer, chargeID int64, testPM string) *stripe.PaymentIntent {
	t.Helper()
	pm, err := b.fake.AttachTestCard(cust.StripeID, testPM)
	require.NoError(t, err)
	var amount int64
	var currency string
	require.NoError(t, b.pool.QueryRow(t.Context(), `select amount, currency from billing.charges where id = $1`, chargeID).Scan(&amount, &currency))
	pi, err := b.stripe.V1PaymentIntents.Create(t.Context(), stripeapi.OffSessionPaymentIntent(cust.StripeID, pm, amount, currency, "retry",
		map[string]string{stripeapi.MetadataChargeID: strconv.FormatInt(chargeID, 10)}, "test-charge-"+strconv.FormatInt(chargeID, 10)+"-attempt-2"))
	require.NoError(t, err)
	require.Equal(t, stripe.PaymentIntentStatusSucceeded, pi.Status)
	return pi
}

// settleCollected records the attempt's success as the charge job's settle does: processing
// becomes succeeded; a charge that waited (retry_scheduled, recovering, uncollectible) becomes
// recovered; a charge already collected another way, or canceled, gets its second payment
// refunded with RefundDuplicateTx (the call the charge job makes). hold runs inside the
// transaction, with the charge locked, before it commits.
func (b *bundle) settleCollected(t *testing.T, chargeID int64, pi *stripe.PaymentIntent, hold func()) {
	t.Helper()
	ctx := t.Context()
	tx, err := b.pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	var status string
	require.NoError(t, tx.QueryRow(ctx, `select status from billing.charges where id = $1 for update`, chargeID).Scan(&status))
	switch status {
	case "processing":
		_, err = tx.Exec(ctx, `update billing.charges set status = 'succeeded', payment_intent_id = $2 where id = $1`, chargeID, pi.ID)
	case "retry_scheduled", "recovering", "uncollectible":
		_, err = tx.Exec(ctx, `update billing.charges set status = 'recovered', payment_intent_id = $2 where id = $1`, chargeID, pi.ID)
	default:
		_, err = jobs.RefundDuplicateTx(ctx, tx, b.client, chargeID, pi.ID, pi.Amount, string(pi.Currency))
	}
	require.NoError(t, err)
	if hold != nil {
		hold()
	}
	require.NoError(t, tx.Commit(ctx))
}
