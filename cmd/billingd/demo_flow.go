package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/money"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/stripefake"
	"github.com/billingd/billingd/worker"
)

// The demo's SQL: what the host application and finance staff would run.
const (
	demoStartSetup = `select billing.start_setup($1, $2, $3, 'v1', $4)`

	demoSetupState = `
select s.status, coalesce(s.url, ''), coalesce(s.last_error, ''),
       coalesce((select p.stripe_payment_method_id || ' (' || coalesce(p.brand, '?') || ' ' || coalesce(p.last4, '????') || ')'
                 from billing.payment_methods p where p.id = c.default_payment_method_id), '')
from billing.setup_sessions s join billing.customers c on c.id = s.customer_id
where s.id = $1`

	// The first installment falls due now: monthly on today's day of the month, from now.
	demoCreatePlan = `
select billing.create_installment_plan(
    customer_ref      => $1,
    description       => $2,
    total_amount      => $3,
    currency          => $4,
    installment_count => $5,
    anchor_day        => extract(day from now() at time zone 'UTC')::integer,
    time_zone         => 'UTC')`

	demoCreateTopupRule = `
select billing.create_topup_rule(
    customer_ref     => $1,
    description      => $2,
    currency         => $3,
    threshold_amount => $4,
    target_amount    => $5)`

	demoSetBalance = `select billing.set_balance($1, $2, $3)`

	demoEnqueueCharge = `select billing.enqueue_charge($1, $2, $3, $4, $5, $6)`

	demoChargeOf = `
select id from billing.charges where source = $1 and source_id = $2 order by id limit 1`

	demoPlanState = `
select status, coalesce(next_due_at::text, 'none'), next_installment from billing.installment_plans where id = $1`

	demoRuleState = `
select r.status, r.fired_count, coalesce((select b.amount from billing.balances b
        where b.customer_id = r.customer_id and b.currency = r.currency), 0)
from billing.topup_rules r where r.id = $1`

	demoChargeState = `
select ch.status, coalesce(ch.status_reason, ''), coalesce(ch.payment_intent_id, ''), ch.amount,
       (select count(*) from billing.charge_attempts a where a.charge_id = ch.id),
       coalesce((select a.outcome || coalesce(' (' || coalesce(a.decline_code, a.error_code) || ')', '')
                 from billing.charge_attempts a where a.charge_id = ch.id order by a.attempt_no desc limit 1), '')
from billing.charges ch where ch.id = $1`

	demoRecoveryState = `
select r.status, r.round,
       coalesce((select s.url from billing.recovery_sessions s where s.charge_id = r.charge_id and s.status = 'open'), '')
from billing.recoveries r where r.charge_id = $1`

	demoNotificationState = `
select n.status, n.attempts, coalesce(n.last_error, '')
from billing.notifications n where n.charge_id = $1 and n.kind = 'recovery' order by n.id limit 1`

	demoSummary = `
select ch.id, cu.customer_ref, ch.source, ch.amount, ch.currency, ch.status, coalesce(ch.payment_intent_id, '')
from billing.charges ch
join billing.customers cu on cu.id = ch.customer_id
order by ch.id`
)

// demoCustomer is one customer of the demo and the test card they save.
type demoCustomer struct {
	Ref, Email, Usage, Currency, Card string
}

var (
	demoAlice = demoCustomer{Ref: "alice", Email: "alice@example.com", Usage: "installments,topups,adhoc", Currency: "usd", Card: "pm_card_visa"}
	// Bob's card saves fine but declines every off-session charge (Stripe's
	// pm_card_chargeCustomerFail), so his installment goes through recovery.
	demoBob = demoCustomer{Ref: "bob", Email: "bob@example.com", Usage: "installments", Currency: "jpy", Card: "pm_card_chargeCustomerFail"}
)

// demoServices are the parts the demo runs in process: stripefake, the daemon and a stand-in for
// the host application that receives billingd's notifications.
type demoServices struct {
	pool    *pgxpool.Pool
	cfg     *config.Config
	fake    *stripefake.Server
	app     *demoApp
	browser *http.Client // the customer's browser: follows no redirects by itself
	listen  *pgx.Conn    // LISTENs on billing_setup, as the application does
	stop    func() error
}

// startDemoServices serves stripefake, starts the daemon with fast cadences (due and reconcile
// every second), points stripefake's webhooks at the daemon's /webhooks/stripe and waits until
// the daemon is ready.
func startDemoServices(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) (*demoServices, error) {
	var closers []func() error
	stop := func() error {
		var errs []error
		for i := len(closers) - 1; i >= 0; i-- {
			errs = append(errs, closers[i]())
		}
		return errors.Join(errs...)
	}
	fail := func(err error) (*demoServices, error) {
		_ = stop()
		return nil, err
	}
	listen := func() (net.Listener, string, error) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, "", fmt.Errorf("listen on 127.0.0.1: %w", err)
		}
		closers = append(closers, func() error { _ = ln.Close(); return nil })
		return ln, "http://" + ln.Addr().String(), nil
	}
	daemonLn, daemonURL, err := listen()
	if err != nil {
		return fail(err)
	}
	fakeLn, fakeURL, err := listen()
	if err != nil {
		return fail(err)
	}
	appLn, appURL, err := listen()
	if err != nil {
		return fail(err)
	}

	webhookSecret := "whsec_demo" + randomHex(16)
	fake := stripefake.New(
		stripefake.WithWebhook(daemonURL+"/webhooks/stripe", webhookSecret),
		stripefake.WithLogger(logger.With("component", "stripefake")),
	)
	closers = append(closers, func() error { fake.Close(); return nil })
	serve := func(ln net.Listener, h http.Handler) {
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		closers = append(closers, srv.Close)
	}
	serve(fakeLn, fake)
	app := newDemoApp("demo_notify_" + randomHex(16))
	serve(appLn, app)

	cfg := &config.Config{}
	_ = config.NewFlagSet("demo", cfg, func(string) string { return "" }) // defaults only, never the environment
	cfg.StripeSecretKey = "sk_test_billingd_demo"
	cfg.StripeWebhookSecret = webhookSecret
	cfg.StripeAPIBase = fakeURL
	cfg.HTTPAddr = daemonLn.Addr().String()
	cfg.PublicURL = daemonURL
	cfg.DueSchedule = "@every 1s"
	cfg.ReconcileSchedule = "@every 1s"
	cfg.NotifyURL = appURL + "/billing/notifications"
	cfg.NotifySecret = app.secret
	cfg.StripeRPS = 100
	cfg.SoftStopTimeout = 5 * time.Second
	if err := cfg.Validate(config.NeedStripe | config.NeedHTTP); err != nil {
		return fail(fmt.Errorf("demo settings: %w", err))
	}

	d, err := worker.New(cfg, pool, logger)
	if err != nil {
		return fail(fmt.Errorf("build the daemon: %w", err))
	}
	dctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	served := make(chan error, 1)
	go func() { served <- d.Serve(dctx, daemonLn) }()
	closers = append(closers, func() error {
		cancel()
		return <-served
	})

	lc, err := pgx.ConnectConfig(ctx, pool.Config().ConnConfig.Copy())
	if err != nil {
		return fail(fmt.Errorf("connect to listen: %w", err))
	}
	closers = append(closers, func() error { return lc.Close(context.Background()) })
	if _, err := lc.Exec(ctx, "listen billing_setup"); err != nil {
		return fail(fmt.Errorf("listen billing_setup: %w", err))
	}

	s := &demoServices{
		pool: pool, cfg: cfg, fake: fake, app: app, listen: lc, stop: stop,
		browser: &http.Client{
			Timeout:       15 * time.Second,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
	err = waitFor(ctx, "the daemon to answer /readyz with 200", func(ctx context.Context) (bool, string, error) {
		select {
		case err := <-served:
			return false, "", fmt.Errorf("the daemon stopped: %w", err)
		default:
		}
		resp, err := s.browser.Get(daemonURL + "/readyz")
		if err != nil {
			return false, err.Error(), nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status, nil
	})
	if err != nil {
		return fail(err)
	}
	return s, nil
}

// demoApp stands in for the host application: it receives billingd's signed notification POSTs
// and checks their signatures, as the README tells an application to.
type demoApp struct {
	secret string

	mu       sync.Mutex
	received []demoNotice
	rejected []string // why POSTs were refused
}

// demoNotice is the part of a notification the demo reads.
type demoNotice struct {
	Type          string `json:"type"`
	CustomerRef   string `json:"customer_ref"`
	ChargeID      int64  `json:"charge_id"`
	AmountDisplay string `json:"amount_display"`
	Description   string `json:"description"`
	URL           string `json:"url"`
}

func newDemoApp(secret string) *demoApp { return &demoApp{secret: secret} }

// ServeHTTP receives one notification.
func (a *demoApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/billing/notifications" {
		http.NotFound(w, r)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, "cannot read the body", http.StatusBadRequest)
		return
	}
	if err := jobs.VerifyNotification(a.secret, r.Header.Get(jobs.SignatureHeader), body, 5*time.Minute, time.Now()); err != nil {
		a.mu.Lock()
		a.rejected = append(a.rejected, err.Error())
		a.mu.Unlock()
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	var n demoNotice
	if err := json.Unmarshal(body, &n); err != nil {
		http.Error(w, "not JSON", http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	a.received = append(a.received, n)
	a.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// notice returns the first notification of type typ about charge id, and why POSTs were
// refused so far.
func (a *demoApp) notice(typ string, chargeID int64) (demoNotice, bool, []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, n := range a.received {
		if n.Type == typ && n.ChargeID == chargeID {
			return n, true, nil
		}
	}
	return demoNotice{}, false, append([]string(nil), a.rejected...)
}

// waitFor calls check every 50 ms until it reports done, or ctx ends. When ctx is the step's
// and its time runs out, the error says what was expected and what was last seen.
func waitFor(ctx context.Context, want string, check func(ctx context.Context) (done bool, state string, err error)) error {
	var state string
	for {
		done, st, err := check(ctx)
		if err != nil && ctx.Err() == nil {
			return err
		}
		if done && err == nil {
			return nil
		}
		if st != "" {
			state = st
		}
		if ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
				continue
			}
		}
		if errors.Is(context.Cause(ctx), errStepTimeout) {
			if state == "" {
				state = "nothing yet"
			}
			return fmt.Errorf("timed out waiting for %s; last seen: %s", want, state)
		}
		return ctx.Err()
	}
}

// demoScenario is the flow the demo drives, step by step, and what it expects of each charge.
type demoScenario struct {
	*demoServices
	expect []demoExpect
	bob    int64  // bob's declined charge
	link   string // bob's recovery link, from his notification
	page   string // the Checkout page the link led to
}

// demoExpect is the final status a charge of the demo must reach.
type demoExpect struct {
	ChargeID int64
	Status   string
}

// runDemo drives the whole flow on a migrated database and returns the summary of every
// charge. Each step prints a progress line through p and fails, naming what it expected, when
// it does not see it within p's step timeout.
func runDemo(ctx context.Context, pool *pgxpool.Pool, p *progress, logger *slog.Logger) (*demoReport, error) {
	var svc *demoServices
	if err := p.step(ctx, "start stripefake and billingd", func(ctx context.Context) (string, error) {
		var err error
		svc, err = startDemoServices(ctx, pool, logger)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("daemon %s, Stripe emulator %s", svc.cfg.PublicURL, svc.cfg.StripeAPIBase), nil
	}); err != nil {
		return nil, err
	}
	defer func() {
		if err := svc.stop(); err != nil {
			logger.Warn("demo services stopped with an error", "error", err)
		}
	}()

	s := &demoScenario{demoServices: svc}
	steps := []struct {
		title string
		fn    func(context.Context) (string, error)
	}{
		{"alice saves a card (pm_card_visa)", func(ctx context.Context) (string, error) { return s.onboard(ctx, demoAlice) }},
		{"bob saves a card (pm_card_chargeCustomerFail)", func(ctx context.Context) (string, error) { return s.onboard(ctx, demoBob) }},
		{"alice's installment plan: 1st installment", s.alicePlan},
		{"alice's top-up rule: balance falls below", s.aliceTopup},
		{"finance's ad-hoc charge to alice", s.aliceAdhoc},
		{"bob's installment plan: his card declines", s.bobDeclines},
		{"bob is notified with a recovery link", s.bobNotified},
		{"bob follows the link", s.bobFollowsLink},
		{"bob pays on the page with pm_card_visa", s.bobPays},
		{"webhooks delivered, jobs settled", s.settle},
	}
	for _, st := range steps {
		if err := p.step(ctx, st.title, st.fn); err != nil {
			return nil, err
		}
	}
	return s.report(ctx)
}

// onboard starts a setup session as the application does (billing.start_setup), waits for its
// hosted page to be announced on billing_setup, completes the page as the customer with c's
// test card and waits until the webhook made it the customer's default payment method.
func (s *demoScenario) onboard(ctx context.Context, c demoCustomer) (string, error) {
	var id int64
	if err := s.pool.QueryRow(ctx, demoStartSetup, c.Ref, c.Email, c.Usage, c.Currency).Scan(&id); err != nil {
		return "", fmt.Errorf("billing.start_setup for %s: %w", c.Ref, err)
	}
	page, err := s.waitSetupOpen(ctx, id)
	if err != nil {
		return "", err
	}
	if _, err := s.payOnPage(ctx, page, c.Card); err != nil {
		return "", err
	}
	var method string
	err = waitFor(ctx, fmt.Sprintf("setup session %d to complete and give %s a default payment method (checkout.session.completed webhook, ingest_event job)", id, c.Ref),
		func(ctx context.Context) (bool, string, error) {
			var status, u, lastErr string
			if err := s.pool.QueryRow(ctx, demoSetupState, id).Scan(&status, &u, &lastErr, &method); err != nil {
				return false, "", err
			}
			return status == "completed" && method != "", fmt.Sprintf("setup session %s, default payment method %q %s", status, method, lastErr), nil
		})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("setup session %d completed on the hosted page; default card %s, consent for %s", id, method, c.Usage), nil
}

// setupNotice is the payload of NOTIFY billing_setup.
type setupNotice struct {
	SetupSessionID int64  `json:"setup_session_id"`
	Status         string `json:"status"`
	URL            string `json:"url"`
	Error          string `json:"error"`
}

// waitSetupOpen waits for the announcement that setup session id has its hosted page, and
// checks the URL against billing.setup_sessions.
func (s *demoScenario) waitSetupOpen(ctx context.Context, id int64) (string, error) {
	for {
		n, err := s.listen.WaitForNotification(ctx)
		if err != nil {
			if errors.Is(context.Cause(ctx), errStepTimeout) {
				var status, u, lastErr, method string
				qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				defer cancel()
				_ = s.pool.QueryRow(qctx, demoSetupState, id).Scan(&status, &u, &lastErr, &method)
				return "", fmt.Errorf("timed out waiting for NOTIFY billing_setup announcing the hosted page of setup session %d (start_setup job); its status is %q %s", id, status, lastErr)
			}
			return "", fmt.Errorf("wait for billing_setup: %w", err)
		}
		var msg setupNotice
		if json.Unmarshal([]byte(n.Payload), &msg) != nil || msg.SetupSessionID != id {
			continue
		}
		switch msg.Status {
		case "open":
			var status, u, lastErr, method string
			if err := s.pool.QueryRow(ctx, demoSetupState, id).Scan(&status, &u, &lastErr, &method); err != nil {
				return "", err
			}
			if u != msg.URL {
				return "", fmt.Errorf("setup session %d: NOTIFY announced %q but billing.setup_sessions holds %q", id, msg.URL, u)
			}
			return msg.URL, nil
		case "failed", "expired":
			return "", fmt.Errorf("setup session %d %s: %s", id, msg.Status, msg.Error)
		}
	}
}

// payOnPage acts as the customer in a browser on a hosted Checkout page: opens it, submits it
// with a test card (accepting the terms when asked), and follows the redirect back to billingd.
// It returns where the page sent the customer.
func (s *demoScenario) payOnPage(ctx context.Context, page, card string) (string, error) {
	body, status, _, err := s.fetch(ctx, http.MethodGet, page, nil)
	if err != nil {
		return "", err
	}
	if status != http.StatusOK || !strings.Contains(body, `id="status">open<`) {
		return "", fmt.Errorf("the hosted page %s answered %d and is not open", page, status)
	}
	form := url.Values{"payment_method": {card}, "accept_terms": {"on"}}
	body, status, loc, err := s.fetch(ctx, http.MethodPost, page, form)
	if err != nil {
		return "", err
	}
	if status != http.StatusSeeOther {
		return "", fmt.Errorf("submitting the hosted page %s with %s answered %d, want 303 back to billingd: %s", page, card, status, pageError(body))
	}
	if _, status, _, err = s.fetch(ctx, http.MethodGet, loc, nil); err != nil {
		return "", err
	}
	if status != http.StatusOK {
		return "", fmt.Errorf("billingd's return page %s answered %d, want 200", loc, status)
	}
	return loc, nil
}

// fetch makes one request as the customer's browser and returns the body, status and Location.
func (s *demoScenario) fetch(ctx context.Context, method, u string, form url.Values) (string, int, string, error) {
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return "", 0, "", fmt.Errorf("%s %s: %w", method, u, err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := s.browser.Do(req)
	if err != nil {
		return "", 0, "", fmt.Errorf("%s %s: %w", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", 0, "", fmt.Errorf("%s %s: %w", method, u, err)
	}
	return string(b), resp.StatusCode, resp.Header.Get("Location"), nil
}

// pageError extracts the error a hosted page shows, for a failure message.
func pageError(body string) string {
	const open = `role="alert">`
	if i := strings.Index(body, open); i >= 0 {
		rest := body[i+len(open):]
		if j := strings.Index(rest, "<"); j >= 0 {
			return rest[:j]
		}
	}
	return "no error shown"
}

// alicePlan creates an installment plan whose first installment is due now and waits until the
// due job has charged it and the charge job has collected it.
func (s *demoScenario) alicePlan(ctx context.Context) (string, error) {
	const total, count = 45000, 3
	var plan int64
	if err := s.pool.QueryRow(ctx, demoCreatePlan, demoAlice.Ref, "Sofa, 3 monthly installments", total, "usd", count).Scan(&plan); err != nil {
		return "", fmt.Errorf("billing.create_installment_plan: %w", err)
	}
	id, err := s.chargeOf(ctx, "installment", plan, "succeeded", func(ctx context.Context) string {
		var status, next string
		var n int
		_ = s.pool.QueryRow(ctx, demoPlanState, plan).Scan(&status, &next, &n)
		return fmt.Sprintf("plan %d is %s, next installment %d due %s", plan, status, n, next)
	})
	if err != nil {
		return "", err
	}
	c, err := s.waitCharge(ctx, id, "succeeded")
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("plan %d (3 x %s); charge %d succeeded, %s", plan, amount(total/count, "usd"), id, c.PaymentIntent), nil
}

// aliceTopup creates a threshold top-up rule, then lets alice's balance fall below it, and waits
// until the top-up (target minus balance) is collected.
func (s *demoScenario) aliceTopup(ctx context.Context) (string, error) {
	const threshold, target, balance = 1000, 5000, 300
	var rule int64
	if err := s.pool.QueryRow(ctx, demoCreateTopupRule, demoAlice.Ref, "Prepaid credit top-up", "usd", threshold, target).Scan(&rule); err != nil {
		return "", fmt.Errorf("billing.create_topup_rule: %w", err)
	}
	if _, err := s.pool.Exec(ctx, demoSetBalance, demoAlice.Ref, "usd", balance); err != nil {
		return "", fmt.Errorf("billing.set_balance: %w", err)
	}
	id, err := s.chargeOf(ctx, "topup", rule, "succeeded", func(ctx context.Context) string {
		var status string
		var fired, bal int64
		_ = s.pool.QueryRow(ctx, demoRuleState, rule).Scan(&status, &fired, &bal)
		return fmt.Sprintf("rule %d is %s, fired %d times, balance %s", rule, status, fired, amount(bal, "usd"))
	})
	if err != nil {
		return "", err
	}
	c, err := s.waitCharge(ctx, id, "succeeded")
	if err != nil {
		return "", err
	}
	if c.Amount != target-balance {
		return "", fmt.Errorf("top-up charge %d is for %s, want %s (target minus balance)", id, amount(c.Amount, "usd"), amount(target-balance, "usd"))
	}
	return fmt.Sprintf("balance %s < %s: charge %d for %s succeeded, %s", amount(balance, "usd"), amount(threshold, "usd"),
		id, amount(c.Amount, "usd"), c.PaymentIntent), nil
}

// aliceAdhoc enqueues an ad-hoc charge as finance does, twice with the same request key, and
// waits until it is collected.
func (s *demoScenario) aliceAdhoc(ctx context.Context) (string, error) {
	const price = 2500
	args := []any{demoAlice.Ref, price, "usd", "Express delivery", "finance@example.com", "demo-ticket-1"}
	var id, again int64
	if err := s.pool.QueryRow(ctx, demoEnqueueCharge, args...).Scan(&id); err != nil {
		return "", fmt.Errorf("billing.enqueue_charge: %w", err)
	}
	if err := s.pool.QueryRow(ctx, demoEnqueueCharge, args...).Scan(&again); err != nil {
		return "", fmt.Errorf("billing.enqueue_charge, repeated: %w", err)
	}
	if again != id {
		return "", fmt.Errorf("billing.enqueue_charge with the same request_key returned charge %d, then %d", id, again)
	}
	s.expect = append(s.expect, demoExpect{id, "succeeded"})
	c, err := s.waitCharge(ctx, id, "succeeded")
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("charge %d (same id for the repeated request_key) succeeded, %s", id, c.PaymentIntent), nil
}

// bobDeclines creates bob's plan; his card declines off-session and recovery opens.
func (s *demoScenario) bobDeclines(ctx context.Context) (string, error) {
	const total, count = 24000, 2
	var plan int64
	if err := s.pool.QueryRow(ctx, demoCreatePlan, demoBob.Ref, "Bicycle, 2 monthly installments", total, "jpy", count).Scan(&plan); err != nil {
		return "", fmt.Errorf("billing.create_installment_plan: %w", err)
	}
	id, err := s.chargeOf(ctx, "installment", plan, "recovered", func(ctx context.Context) string {
		var status, next string
		var n int
		_ = s.pool.QueryRow(ctx, demoPlanState, plan).Scan(&status, &next, &n)
		return fmt.Sprintf("plan %d is %s, next installment %d due %s", plan, status, n, next)
	})
	if err != nil {
		return "", err
	}
	s.bob = id
	c, err := s.waitCharge(ctx, id, "recovering", "retry_scheduled")
	if err != nil {
		return "", err
	}
	var status string
	var round int
	var page string
	err = waitFor(ctx, fmt.Sprintf("an open recovery of charge %d", id), func(ctx context.Context) (bool, string, error) {
		err := s.pool.QueryRow(ctx, demoRecoveryState, id).Scan(&status, &round, &page)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, "no row in billing.recoveries", nil
		}
		if err != nil {
			return false, "", err
		}
		return status == "open", "recovery " + status, nil
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("charge %d for %s: attempt %s, charge %s, recovery opened", id, amount(total/count, "jpy"), c.LastAttempt, c.Status), nil
}

// bobNotified waits for the signed notification that the host application receives, and takes
// the recovery link from it.
func (s *demoScenario) bobNotified(ctx context.Context) (string, error) {
	var n demoNotice
	err := waitFor(ctx, fmt.Sprintf("a recovery.payment_required notification about charge %d at the application (notify_recovery, deliver_notification)", s.bob),
		func(ctx context.Context) (bool, string, error) {
			var ok bool
			var rejected []string
			if n, ok, rejected = s.app.notice("recovery.payment_required", s.bob); ok {
				return true, "", nil
			}
			if len(rejected) > 0 {
				return false, "", fmt.Errorf("the application refused billingd's notification: %s", rejected[0])
			}
			var status, lastErr string
			var attempts int
			err := s.pool.QueryRow(ctx, demoNotificationState, s.bob).Scan(&status, &attempts, &lastErr)
			if errors.Is(err, pgx.ErrNoRows) {
				return false, "no row in billing.notifications yet", nil
			}
			if err != nil {
				return false, "", err
			}
			return false, fmt.Sprintf("notification %s after %d attempts %s", status, attempts, lastErr), nil
		})
	if err != nil {
		return "", err
	}
	prefix := s.cfg.PublicURL + "/recover/"
	if !strings.HasPrefix(n.URL, prefix) {
		return "", fmt.Errorf("the notification's link %q does not lead through billingd (%s...)", n.URL, prefix)
	}
	s.link = n.URL
	return fmt.Sprintf("signed POST to the application: pay %s for %q at %s...", n.AmountDisplay, n.Description, n.URL[:len(prefix)+6]), nil
}

// bobFollowsLink opens the recovery link: billingd answers 303 to the charge's open Checkout page.
func (s *demoScenario) bobFollowsLink(ctx context.Context) (string, error) {
	_, status, loc, err := s.fetch(ctx, http.MethodGet, s.link, nil)
	if err != nil {
		return "", err
	}
	if status != http.StatusSeeOther || loc == "" {
		return "", fmt.Errorf("the recovery link answered %d, want 303 to a Checkout page", status)
	}
	var rstatus string
	var round int
	var open string
	if err := s.pool.QueryRow(ctx, demoRecoveryState, s.bob).Scan(&rstatus, &round, &open); err != nil {
		return "", fmt.Errorf("read the recovery of charge %d: %w", s.bob, err)
	}
	if loc != open {
		return "", fmt.Errorf("the recovery link led to %s, but the open recovery session of charge %d is %q", loc, s.bob, open)
	}
	s.page = loc
	return "303 See Other to the open Checkout page " + loc, nil
}

// bobPays pays the recovery page with a working card and waits until the webhook marked the
// charge recovered.
func (s *demoScenario) bobPays(ctx context.Context) (string, error) {
	back, err := s.payOnPage(ctx, s.page, "pm_card_visa")
	if err != nil {
		return "", err
	}
	c, err := s.waitCharge(ctx, s.bob, "recovered")
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("back at %s; charge %d recovered, %s", strings.TrimPrefix(back, s.cfg.PublicURL), s.bob, c.PaymentIntent), nil
}

// settle waits until stripefake has delivered every webhook and the daemon has no job left to
// run now, so that the summary reads a quiet database.
func (s *demoScenario) settle(ctx context.Context) (string, error) {
	if err := s.fake.WaitForDeliveries(ctx); err != nil {
		return "", fmt.Errorf("timed out waiting for stripefake to deliver every webhook: %w", err)
	}
	var left int
	err := waitFor(ctx, "no River job available or running", func(ctx context.Context) (bool, string, error) {
		if err := s.pool.QueryRow(ctx, `select count(*) from river_job where state in ('available', 'running')`).Scan(&left); err != nil {
			return false, "", err
		}
		return left == 0, fmt.Sprintf("%d jobs available or running", left), nil
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d webhook events delivered, %d Stripe API requests", len(s.fake.DeliveredEvents()), sumCounts(s.fake.RequestCounts())), nil
}

func sumCounts(m map[string]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// chargeOf waits until the due job has created the charge of a plan or rule, and returns it;
// the summary expects the charge to end in status final.
func (s *demoScenario) chargeOf(ctx context.Context, source string, sourceID int64, final string, state func(context.Context) string) (int64, error) {
	var id int64
	err := waitFor(ctx, fmt.Sprintf("the due job to create the charge of %s %d", source, sourceID), func(ctx context.Context) (bool, string, error) {
		err := s.pool.QueryRow(ctx, demoChargeOf, source, sourceID).Scan(&id)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, state(ctx), nil
		}
		return err == nil, "", err
	})
	if err != nil {
		return 0, err
	}
	s.expect = append(s.expect, demoExpect{id, final})
	return id, nil
}

// demoChargeNow is what the demo sees of a charge while it waits.
type demoChargeNow struct {
	Status, Reason, PaymentIntent, LastAttempt string
	Amount                                     int64
	Attempts                                   int
}

// waitCharge waits until charge id is in one of the statuses want.
func (s *demoScenario) waitCharge(ctx context.Context, id int64, want ...string) (demoChargeNow, error) {
	var c demoChargeNow
	err := waitFor(ctx, fmt.Sprintf("charge %d to be %s", id, strings.Join(want, " or ")), func(ctx context.Context) (bool, string, error) {
		if err := s.pool.QueryRow(ctx, demoChargeState, id).Scan(&c.Status, &c.Reason, &c.PaymentIntent, &c.Amount, &c.Attempts, &c.LastAttempt); err != nil {
			return false, "", err
		}
		state := fmt.Sprintf("charge %d is %s after %d attempts", id, c.Status, c.Attempts)
		if c.LastAttempt != "" {
			state += " (last: " + c.LastAttempt + ")"
		}
		if c.Reason != "" {
			state += ": " + c.Reason
		}
		for _, w := range want {
			if c.Status == w {
				return true, state, nil
			}
		}
		return false, state, nil
	})
	return c, err
}

// demoReport is the demo's summary: every charge, the ledger per currency against what Stripe
// kept, and what did not check out.
type demoReport struct {
	Charges  []demoChargeRow
	Ledger   []demoLedgerRow
	Problems []string
}

// demoChargeRow is one charge in the summary.
type demoChargeRow struct {
	ID             int64
	Customer       string
	Source         string
	Amount         int64
	Currency       string
	Status         string
	Expected       string // the status the demo expects, "" for a charge it did not create
	PaymentIntent  string
	StripePayments int // succeeded PaymentIntents at Stripe with this charge_id
}

// demoLedgerRow compares, for one currency, what billingd counts as collected with what Stripe
// kept (collected minus refunded).
type demoLedgerRow struct {
	Currency string
	Billingd int64
	Stripe   int64
}

// report reads every charge and checks the outcome: each charge in its expected status, each
// collected charge paid exactly once at Stripe and no other charge paid at all, and the ledger
// equal to what Stripe kept, per currency.
func (s *demoScenario) report(ctx context.Context) (*demoReport, error) {
	rows, err := s.pool.Query(ctx, demoSummary)
	if err != nil {
		return nil, fmt.Errorf("read the charges: %w", err)
	}
	charges, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (demoChargeRow, error) {
		var c demoChargeRow
		err := r.Scan(&c.ID, &c.Customer, &c.Source, &c.Amount, &c.Currency, &c.Status, &c.PaymentIntent)
		return c, err
	})
	if err != nil {
		return nil, fmt.Errorf("read the charges: %w", err)
	}
	rep := &demoReport{Charges: charges}
	want := map[int64]string{}
	for _, e := range s.expect {
		want[e.ChargeID] = e.Status
	}
	paid := s.fake.SuccessfulChargesByChargeID()
	ledger := map[string]*demoLedgerRow{}
	for i := range rep.Charges {
		c := &rep.Charges[i]
		c.Expected = want[c.ID]
		delete(want, c.ID)
		c.StripePayments = paid[strconv.FormatInt(c.ID, 10)]
		delete(paid, strconv.FormatInt(c.ID, 10))
		if c.Expected == "" {
			rep.Problems = append(rep.Problems, fmt.Sprintf("charge %d was not made by the demo", c.ID))
		} else if c.Status != c.Expected {
			rep.Problems = append(rep.Problems, fmt.Sprintf("charge %d is %s, want %s", c.ID, c.Status, c.Expected))
		}
		collected := c.Status == "succeeded" || c.Status == "recovered"
		switch {
		case collected && c.StripePayments != 1:
			rep.Problems = append(rep.Problems, fmt.Sprintf("charge %d is %s but Stripe has %d successful payments for it, want 1", c.ID, c.Status, c.StripePayments))
		case !collected && c.StripePayments != 0:
			rep.Problems = append(rep.Problems, fmt.Sprintf("charge %d is %s but Stripe has %d successful payments for it", c.ID, c.Status, c.StripePayments))
		}
		l := ledger[c.Currency]
		if l == nil {
			l = &demoLedgerRow{Currency: c.Currency}
			ledger[c.Currency] = l
		}
		if collected {
			l.Billingd += c.Amount
		}
	}
	for id, st := range want {
		rep.Problems = append(rep.Problems, fmt.Sprintf("charge %d (want %s) is missing", id, st))
	}
	for id, n := range paid {
		rep.Problems = append(rep.Problems, fmt.Sprintf("Stripe has %d successful payments for charge_id %s, which billingd does not know", n, id))
	}
	for cur, t := range s.fake.Totals() {
		l := ledger[cur]
		if l == nil {
			l = &demoLedgerRow{Currency: cur}
			ledger[cur] = l
		}
		l.Stripe = t.Net()
	}
	for _, l := range ledger {
		rep.Ledger = append(rep.Ledger, *l)
		if l.Billingd != l.Stripe {
			rep.Problems = append(rep.Problems, fmt.Sprintf("ledger in %s: billingd counts %d collected, Stripe kept %d", l.Currency, l.Billingd, l.Stripe))
		}
	}
	sort.Slice(rep.Ledger, func(i, j int) bool { return rep.Ledger[i].Currency < rep.Ledger[j].Currency })
	sort.Strings(rep.Problems)
	return rep, nil
}

// print writes the summary: a table of every charge and the ledger check.
func (r *demoReport) print(w io.Writer) {
	fmt.Fprintln(w, "\nCharges:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  ID\tCUSTOMER\tSOURCE\tAMOUNT\tSTATUS\tEXPECTED\tPAYMENTINTENT\tPAID AT STRIPE")
	for _, c := range r.Charges {
		check := "ok"
		if c.Status != c.Expected {
			check = "WANT " + c.Expected
		}
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\t%s\t%dx\n", c.ID, c.Customer, c.Source,
			amount(c.Amount, c.Currency), c.Status, check, orDash(c.PaymentIntent), c.StripePayments)
	}
	_ = tw.Flush()
	fmt.Fprintln(w, "\nLedger: collected by billingd (succeeded + recovered) against what Stripe kept (collected - refunded):")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  CURRENCY\tBILLINGD\tSTRIPE\t")
	for _, l := range r.Ledger {
		check := "equal"
		if l.Billingd != l.Stripe {
			check = "DIFFERENT"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", l.Currency, amount(l.Billingd, l.Currency), amount(l.Stripe, l.Currency), check)
	}
	_ = tw.Flush()
	if len(r.Problems) == 0 {
		fmt.Fprintln(w, "\nEvery charge reached its expected status, each collected charge was paid exactly once at Stripe, and the ledger equals what Stripe collected.")
		return
	}
	fmt.Fprintln(w, "\nProblems:")
	for _, p := range r.Problems {
		fmt.Fprintln(w, "  - "+p)
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// amount writes an amount (minor units) of currency for a person, as notifications do:
// "$150.00", "¥12,000".
func amount(minor int64, currency string) string {
	s, err := money.Format(minor, currency)
	if err != nil {
		return fmt.Sprintf("%d %s", minor, strings.ToUpper(currency))
	}
	return s
}
