package jobs_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/stripefake"
)

// fakeStripe serves a stripefake emulator over HTTP and returns it with a billingd Stripe client
// pointed at it.
func fakeStripe(t *testing.T, opts ...stripefake.Option) (*stripefake.Server, *stripe.Client) {
	t.Helper()
	fake := stripefake.New(opts...)
	srv := httptest.NewServer(fake)
	t.Cleanup(func() {
		srv.Close()
		fake.Close()
	})
	return fake, stripeapi.NewClient("sk_test_webhooks", srv.URL, srv.Client(), 2)
}

// setupNote is the payload of NOTIFY billing_setup.
type setupNote struct {
	SetupSessionID int64     `json:"setup_session_id"`
	CustomerRef    string    `json:"customer_ref"`
	Status         string    `json:"status"`
	URL            string    `json:"url"`
	ExpiresAt      time.Time `json:"expires_at"`
	Error          *string   `json:"error"`
}

// setupListener listens on billing_setup until the test ends.
type setupListener struct {
	t    *testing.T
	conn *pgxpool.Conn
}

func listenSetup(t *testing.T, pool *pgxpool.Pool) *setupListener {
	t.Helper()
	conn, err := pool.Acquire(context.Background())
	require.NoError(t, err)
	t.Cleanup(conn.Release)
	_, err = conn.Exec(context.Background(), "listen billing_setup")
	require.NoError(t, err)
	return &setupListener{t: t, conn: conn}
}

// next waits for the next announcement about setup session id with the given status.
func (l *setupListener) next(id int64, status string) setupNote {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		n, err := l.conn.Conn().WaitForNotification(ctx)
		require.NoError(l.t, err, "waiting for billing_setup %s of %d", status, id)
		var note setupNote
		require.NoError(l.t, json.Unmarshal([]byte(n.Payload), &note), n.Payload)
		if note.SetupSessionID == id && note.Status == status {
			return note
		}
	}
}

// completeAsCustomer submits the hosted page at pageURL with a test card, accepting the terms, as
// the customer's browser does, and requires the redirect to the success URL.
func completeAsCustomer(t *testing.T, pageURL, testCard string) {
	t.Helper()
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.PostForm(pageURL, url.Values{"payment_method": {testCard}, "accept_terms": {"on"}})
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusSeeOther, resp.StatusCode, "the hosted page accepted the card")
	require.Equal(t, "http://localhost:8080/setup/done", resp.Header.Get("Location"))
}

// onboardingState is everything a completed setup writes, as one comparable value.
type onboardingState struct {
	SessionStatus     string
	CheckoutSessionID string
	StripeCustomer    string
	Methods           []string // stripe id, status, brand, last4, expiry, has fingerprint
	DefaultMethod     string
	Consents          []string // usage, terms version, checkout session, setup intent, setup session, method
	Events, Jobs      int
}

func readOnboarding(t *testing.T, pool *pgxpool.Pool, setupID int64) onboardingState {
	t.Helper()
	ctx := context.Background()
	var s onboardingState
	require.NoError(t, pool.QueryRow(ctx, `select s.status, coalesce(s.checkout_session_id, ''), coalesce(c.stripe_customer_id, ''),
			coalesce((select p.stripe_payment_method_id from billing.payment_methods p where p.id = c.default_payment_method_id), '')
		from billing.setup_sessions s join billing.customers c on c.id = s.customer_id where s.id = $1`, setupID).
		Scan(&s.SessionStatus, &s.CheckoutSessionID, &s.StripeCustomer, &s.DefaultMethod))
	rows, err := pool.Query(ctx, `select format('%s %s %s %s %s/%s %s', stripe_payment_method_id, status, brand, last4, exp_month, exp_year,
		fingerprint is not null) from billing.payment_methods order by id`)
	require.NoError(t, err)
	for rows.Next() {
		var m string
		require.NoError(t, rows.Scan(&m))
		s.Methods = append(s.Methods, m)
	}
	require.NoError(t, rows.Err())
	rows, err = pool.Query(ctx, `select format('%s %s %s %s %s %s', k.usage, k.terms_version, k.checkout_session_id, k.setup_intent_id,
		k.setup_session_id, p.stripe_payment_method_id) from billing.consents k join billing.payment_methods p on p.id = k.payment_method_id order by k.id`)
	require.NoError(t, err)
	for rows.Next() {
		var c string
		require.NoError(t, rows.Scan(&c))
		s.Consents = append(s.Consents, c)
	}
	require.NoError(t, rows.Err())
	require.NoError(t, pool.QueryRow(ctx, `select (select count(*) from billing.webhook_events),
		(select count(*) from river_job where kind = 'ingest_event')`).Scan(&s.Events, &s.Jobs))
	return s
}

func TestOnboardingEndToEnd(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// Stripe may deliver an event twice and out of order: stripefake does both, every time.
	fake, sc := fakeStripe(t, stripefake.WithDelivery(stripefake.DeliveryOptions{
		DuplicateProbability: 1, ReorderWindow: 20 * time.Millisecond,
	}))
	h := newHarness(t, harnessOpts{stripe: sc})
	fake.SetWebhook(h.hooks.URL, webhookSecret)
	setup := listenSetup(t, h.pool)

	var id int64
	require.NoError(t, h.pool.QueryRow(ctx, `select billing.start_setup('ada', 'ada@example.com', 'installments, adhoc', 'v1', 'EUR')`).Scan(&id))
	open := setup.next(id, "open")
	require.Equal(t, "ada", open.CustomerRef)
	require.NotEmpty(t, open.URL)
	require.WithinDuration(t, time.Now().Add(24*time.Hour), open.ExpiresAt, time.Minute)

	// What billingd asked Stripe for.
	var csID, cusID string
	require.NoError(t, h.pool.QueryRow(ctx, `select s.checkout_session_id, c.stripe_customer_id
		from billing.setup_sessions s join billing.customers c on c.id = s.customer_id where s.id = $1`, id).Scan(&csID, &cusID))
	cs, ok := fake.CheckoutSession(csID)
	require.True(t, ok)
	require.Equal(t, "setup", cs.Mode)
	require.Equal(t, "eur", cs.Currency)
	require.Equal(t, cusID, cs.Customer)
	require.Equal(t, open.URL, cs.URL)
	installation, err := jobs.LoadInstallation(ctx, h.pool)
	require.NoError(t, err)
	require.Equal(t, map[string]string{"setup_session_id": fmt.Sprint(id), "customer_ref": "ada",
		"usage": "installments,adhoc", "terms_version": "v1", "billingd_installation": installation}, cs.Metadata)

	// The customer opens the link and saves a card, accepting the terms.
	completeAsCustomer(t, open.URL, "pm_card_visa")
	setup.next(id, "completed")
	require.NoError(t, fake.WaitForDeliveries(ctx))
	h.waitJobs(t, "ingest_event")

	pms := fake.CustomerPaymentMethods(cusID)
	require.Len(t, pms, 1)
	pmID := pms[0].ID
	card, err := sc.V1PaymentMethods.Retrieve(ctx, pmID, nil)
	require.NoError(t, err)
	done, _ := fake.CheckoutSession(csID)
	got := readOnboarding(t, h.pool, id)
	events := fake.Events()
	require.Equal(t, onboardingState{
		SessionStatus:     "completed",
		CheckoutSessionID: csID,
		StripeCustomer:    cusID,
		Methods:           []string{fmt.Sprintf("%s attached visa 4242 %d/%d t", pmID, card.Card.ExpMonth, card.Card.ExpYear)},
		DefaultMethod:     pmID,
		Consents:          []string{fmt.Sprintf("{installments,adhoc} v1 %s %s %d %s", csID, done.SetupIntent, id, pmID)},
		Events:            len(events),
		Jobs:              len(events),
	}, got, "events: %v", eventTypes(events))

	// The consent copies the terms that were shown, with the time of acceptance.
	var termsCopied bool
	var acceptedAt time.Time
	require.NoError(t, h.pool.QueryRow(ctx, `select (k.agreement, k.timing, k.amount_basis, k.cancellation_policy)
			= (t.agreement, t.timing, t.amount_basis, t.cancellation_policy), k.accepted_at
		from billing.consents k join billing.terms t on t.version = k.terms_version`).Scan(&termsCopied, &acceptedAt))
	require.True(t, termsCopied)
	require.WithinDuration(t, time.Now(), acceptedAt, time.Minute)
	var unapplied int
	require.NoError(t, h.pool.QueryRow(ctx, `select count(*) from billing.webhook_events where status not in ('processed', 'ignored')`).Scan(&unapplied))
	require.Zero(t, unapplied, "every event applied or ignored")

	// The saved card can be charged off-session.
	pi, err := sc.V1PaymentIntents.Create(ctx, stripeapi.OffSessionPaymentIntent(cusID, pmID, 1999, "eur", "first installment",
		map[string]string{"purpose": "e2e"}, "e2e-charge-1"))
	require.NoError(t, err)
	require.Equal(t, stripe.PaymentIntentStatusSucceeded, pi.Status)
	require.NoError(t, fake.WaitForDeliveries(ctx))
	h.waitJobs(t, "ingest_event")
	events = fake.Events()

	// Every event again, three times each, shuffled: nothing changes.
	before := readOnboarding(t, h.pool, id)
	var bodies [][]byte
	for _, e := range events {
		bodies = append(bodies, e.Payload)
	}
	for _, b := range shuffled(t, bodies...) {
		h.deliver(t, b)
	}
	h.waitJobs(t, "ingest_event")
	require.Equal(t, before, readOnboarding(t, h.pool, id))

	// The customer removes the card at Stripe: it is no longer attached nor the default.
	_, err = sc.V1PaymentMethods.Detach(ctx, pmID, nil)
	require.NoError(t, err)
	require.NoError(t, fake.WaitForDeliveries(ctx))
	h.waitJobs(t, "ingest_event")
	after := readOnboarding(t, h.pool, id)
	require.Equal(t, []string{fmt.Sprintf("%s detached visa 4242 %d/%d t", pmID, card.Card.ExpMonth, card.Card.ExpYear)}, after.Methods)
	require.Empty(t, after.DefaultMethod)
}

func eventTypes(events []stripefake.Event) []string {
	var out []string
	for _, e := range events {
		out = append(out, e.Type)
	}
	return out
}

func TestStartSetupRunsOnceUnderRetriesAndDuplicates(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fake, sc := fakeStripe(t)
	h := newHarness(t, harnessOpts{stripe: sc})
	setup := listenSetup(t, h.pool)

	// Both creations are done by Stripe but their answers are lost: stripe-go retries with the
	// same key and gets the stored result. And the job runs twice (a duplicate insert, as a
	// rescued job would).
	fake.InjectFaults(stripefake.KindCreateCustomer, 1, stripefake.Fault{Kind: stripefake.FaultDropAfter, Latency: 50 * time.Millisecond})
	fake.InjectFaults(stripefake.KindCreateCheckoutSession, 1, stripefake.Fault{Kind: stripefake.FaultDropAfter, Latency: 50 * time.Millisecond})
	tx, err := h.pool.Begin(ctx)
	require.NoError(t, err)
	var id int64
	require.NoError(t, tx.QueryRow(ctx, `select billing.start_setup('bob', 'bob@example.com', 'topups', 'v1')`).Scan(&id))
	_, err = tx.Exec(ctx, `insert into river_job (args, kind, queue, max_attempts) values (jsonb_build_object('setup_session_id', $1::bigint), 'start_setup', 'default', 10)`, id)
	require.NoError(t, err)
	require.NoError(t, tx.Commit(ctx))

	open := setup.next(id, "open")
	h.waitCompleted(t, "start_setup", 2)
	// A third run after the session is open changes nothing.
	_, err = h.pool.Exec(ctx, `insert into river_job (args, kind, queue, max_attempts) values (jsonb_build_object('setup_session_id', $1::bigint), 'start_setup', 'default', 10)`, id)
	require.NoError(t, err)
	h.waitCompleted(t, "start_setup", 3)

	require.Len(t, fake.CheckoutSessionsByMetadata("setup_session_id", fmt.Sprint(id)), 1, "one Checkout Session")
	require.Equal(t, 1, countEvents(fake, "customer.created"), "one Stripe customer")
	require.GreaterOrEqual(t, fake.RequestCount(stripefake.KindCreateCheckoutSession), int64(2), "the lost answers were retried")
	var url string
	var opened int
	require.NoError(t, h.pool.QueryRow(ctx, `select url, (select count(*) from river_job where kind = 'start_setup' and state = 'completed')
		from billing.setup_sessions where id = $1`, id).Scan(&url, &opened))
	require.Equal(t, open.URL, url)
	require.Equal(t, 3, opened)
}

func TestStartSetupAfterAStripe500UsesFreshKeys(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fake, sc := fakeStripe(t)
	h := newHarness(t, harnessOpts{stripe: sc})
	setup := listenSetup(t, h.pool)

	// Stripe creates the session but answers 500, and stores that 500 under the key: a retry with
	// the same key would get it back for 24 hours. The next attempt uses the next key generation.
	fake.InjectFaults(stripefake.KindCreateCheckoutSession, 1, stripefake.Fault{Kind: stripefake.Fault500After})
	var id int64
	require.NoError(t, h.pool.QueryRow(ctx, `select billing.start_setup('cy', 'cy@example.com', 'adhoc', 'v1')`).Scan(&id))
	open := setup.next(id, "open")

	sessions := fake.CheckoutSessionsByMetadata("setup_session_id", fmt.Sprint(id))
	require.Len(t, sessions, 2, "the session behind the 500 is left to expire unseen")
	var csID string
	require.NoError(t, h.pool.QueryRow(ctx, `select checkout_session_id from billing.setup_sessions where id = $1`, id).Scan(&csID))
	stored, ok := fake.CheckoutSession(csID)
	require.True(t, ok)
	require.Equal(t, open.URL, stored.URL)
	require.Equal(t, 1, countEvents(fake, "customer.created"), "the customer was not created twice")
}

func TestStartSetupFailsVisiblyWhenStripeRefuses(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, sc := fakeStripe(t)
	// A success URL that Stripe refuses: the session fails with the reason, announced.
	h := newHarness(t, harnessOpts{stripe: sc, configure: func(c *config.Config) { c.SetupSuccessURL = "not a url" }})
	setup := listenSetup(t, h.pool)
	var id int64
	require.NoError(t, h.pool.QueryRow(ctx, `select billing.start_setup('dee', 'dee@example.com', 'adhoc', 'v1')`).Scan(&id))
	failed := setup.next(id, "failed")
	require.NotNil(t, failed.Error)
	require.Contains(t, *failed.Error, "Stripe refused the request")
	h.waitJobs(t, "start_setup")
	var state string
	var attempt int
	require.NoError(t, h.pool.QueryRow(ctx, `select state, attempt from river_job where kind = 'start_setup'`).Scan(&state, &attempt))
	require.Equal(t, "completed", state)
	require.Equal(t, 1, attempt, "a refusal is not retried")
}

func TestStartSetupForAccountWithoutLinkFails(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fake, sc := fakeStripe(t)
	h := newHarness(t, harnessOpts{stripe: sc, configure: func(c *config.Config) { c.StripeCustomerModel = "account" }})
	setup := listenSetup(t, h.pool)
	var id int64
	require.NoError(t, h.pool.QueryRow(ctx, `select billing.start_setup('eve', 'eve@example.com', 'adhoc', 'v1')`).Scan(&id))
	failed := setup.next(id, "failed")
	require.Contains(t, *failed.Error, "billing.set_stripe_account")
	require.Zero(t, fake.RequestCount(stripefake.KindCreateCustomer), "no Customer in the Accounts v2 model")
	require.Zero(t, fake.RequestCount(stripefake.KindCreateCheckoutSession))
}

func countEvents(fake *stripefake.Server, typ string) int {
	n := 0
	for _, e := range fake.Events() {
		if e.Type == typ {
			n++
		}
	}
	return n
}

// deliverAll delivers stripefake's events to the harness's handler in the order given, as
// Stripe would, and waits until they are ingested.
func deliverAll(t *testing.T, h *harness, events []stripefake.Event) {
	t.Helper()
	for _, e := range events {
		h.deliver(t, e.Payload)
	}
	h.waitJobs(t, "ingest_event")
}

func TestSetupCompletedAttachesWhenTheSessionHadNoCustomer(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fake, sc := fakeStripe(t) // no webhook endpoint: the test delivers
	h := newHarness(t, harnessOpts{stripe: sc})

	installation, err := jobs.LoadInstallation(ctx, h.pool)
	require.NoError(t, err)
	cus, err := sc.V1Customers.Create(ctx, stripeapi.CustomerCreate(installation, "fay", "fay@example.com"))
	require.NoError(t, err)
	var customerID, id int64
	require.NoError(t, h.pool.QueryRow(ctx, `insert into billing.customers (customer_ref, email, stripe_customer_id)
		values ('fay', 'fay@example.com', $1) returning id`, cus.ID).Scan(&customerID))
	require.NoError(t, h.pool.QueryRow(ctx, `insert into billing.setup_sessions (customer_id, usage, terms_version, currency)
		values ($1, '{topups}', 'v1', 'usd') returning id`, customerID).Scan(&id))
	// A session created without a customer (as an application might create it itself).
	params := stripeapi.OnboardingSession(installation, id, "", "usd", "https://app.example/ok", "https://app.example/no",
		map[string]string{"setup_session_id": fmt.Sprint(id)}, "I agree.")
	params.Customer = nil
	cs, err := sc.V1CheckoutSessions.Create(ctx, params)
	require.NoError(t, err)
	_, err = h.pool.Exec(ctx, `update billing.setup_sessions set status = 'open', checkout_session_id = $2, url = $3 where id = $1`, id, cs.ID, cs.URL)
	require.NoError(t, err)
	require.NoError(t, fake.CompleteCheckoutSession(ctx, cs.ID, "pm_card_mastercard"))
	require.Empty(t, fake.CustomerPaymentMethods(cus.ID), "Checkout attached nothing")

	deliverAll(t, h, fake.Events())

	pms := fake.CustomerPaymentMethods(cus.ID)
	require.Len(t, pms, 1, "billingd attached the method to the customer")
	got := readOnboarding(t, h.pool, id)
	require.Equal(t, "completed", got.SessionStatus)
	require.Equal(t, pms[0].ID, got.DefaultMethod)
	require.Len(t, got.Consents, 1)
	require.Contains(t, got.Consents[0], "{topups} v1 "+cs.ID)
}

func TestSetupCompletedAfterTheMethodWasDetached(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fake, sc := fakeStripe(t) // no webhook endpoint: the test delivers, out of order
	h := newHarness(t, harnessOpts{stripe: sc})
	setup := listenSetup(t, h.pool)
	var id int64
	require.NoError(t, h.pool.QueryRow(ctx, `select billing.start_setup('gus', 'gus@example.com', 'adhoc', 'v1')`).Scan(&id))
	open := setup.next(id, "open")
	completeAsCustomer(t, open.URL, "pm_card_visa")
	var cusID string
	require.NoError(t, h.pool.QueryRow(ctx, `select stripe_customer_id from billing.customers where customer_ref = 'gus'`).Scan(&cusID))
	pmID := fake.CustomerPaymentMethods(cusID)[0].ID
	_, err := sc.V1PaymentMethods.Detach(ctx, pmID, nil)
	require.NoError(t, err)

	// The detachment arrives first (about a method billingd does not know yet), the completion
	// after it: the method is recorded as detached and does not become the default.
	events := fake.Events()
	var detached, rest []stripefake.Event
	for _, e := range events {
		if e.Type == "payment_method.detached" {
			detached = append(detached, e)
		} else {
			rest = append(rest, e)
		}
	}
	require.Len(t, detached, 1)
	deliverAll(t, h, detached)
	status, _ := h.eventStatus(t, detached[0].ID)
	require.Equal(t, "unknown_object", status)
	deliverAll(t, h, rest)

	got := readOnboarding(t, h.pool, id)
	require.Equal(t, "completed", got.SessionStatus)
	require.Len(t, got.Methods, 1)
	require.Contains(t, got.Methods[0], pmID+" detached ")
	require.Empty(t, got.DefaultMethod, "a detached method is not the default")
}
