package jobs_test

import (
	"context"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
)

// shuffled returns every body three times, in a random order (the seed is logged).
func shuffled(t *testing.T, bodies ...[]byte) [][]byte {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	t.Logf("shuffle seed %d", seed)
	r := rand.New(rand.NewPCG(seed, seed))
	var all [][]byte
	for _, b := range bodies {
		all = append(all, b, b, b)
	}
	r.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	return all
}

func card(id, last4 string, expYear int) map[string]any {
	return map[string]any{
		"id": id, "object": "payment_method", "type": "card",
		"card": map[string]any{"brand": "visa", "last4": last4, "exp_month": 6, "exp_year": expYear, "fingerprint": "fp_" + last4},
	}
}

func TestPaymentMethodEventsApplyOnceInAnyOrder(t *testing.T) {
	t.Parallel()
	h := newHarness(t, harnessOpts{})
	ctx := context.Background()
	c := dbtest.NewCustomer(t, h.pool, dbtest.CustomerOpts{Ref: "ada", PaymentMethodID: "pm_ada"})
	t0 := time.Now().Add(-time.Hour).Truncate(time.Second)

	older := eventJSON(t, "evt_upd_1", "payment_method.automatically_updated", t0.Add(10*time.Second), card("pm_ada", "1111", 2031))
	newer := eventJSON(t, "evt_upd_2", "payment_method.automatically_updated", t0.Add(20*time.Second), card("pm_ada", "2222", 2032))
	detached := eventJSON(t, "evt_det", "payment_method.detached", t0.Add(30*time.Second), card("pm_ada", "2222", 2032))
	unknownPM := eventJSON(t, "evt_det_unknown", "payment_method.detached", t0, card("pm_nobody", "9999", 2030))
	unknownUpd := eventJSON(t, "evt_upd_unknown", "payment_method.automatically_updated", t0, card("pm_nobody", "9999", 2030))
	other := eventJSON(t, "evt_other", "customer.updated", t0, map[string]any{"id": "cus_ada", "object": "customer"})

	// Out of order for certain first: the newer update is applied, then the older one arrives.
	h.deliver(t, newer)
	h.waitJobs(t, "ingest_event")
	h.deliver(t, older)
	h.waitJobs(t, "ingest_event")
	var last4 string
	require.NoError(t, h.pool.QueryRow(ctx, `select last4 from billing.payment_methods where stripe_payment_method_id = 'pm_ada'`).Scan(&last4))
	require.Equal(t, "2222", last4, "an older update delivered late changes nothing")

	// Then everything three times, shuffled.
	for _, b := range shuffled(t, older, newer, detached, unknownPM, unknownUpd, other) {
		h.deliver(t, b)
	}
	h.waitJobs(t, "ingest_event")

	var (
		status          string
		expYear         int
		detachedAt      time.Time
		cardUpdatedAt   time.Time
		defaultMethod   *int64
		events, ingests int
	)
	require.NoError(t, h.pool.QueryRow(ctx, `select status, last4, exp_year, detached_at, card_updated_at
		from billing.payment_methods where stripe_payment_method_id = 'pm_ada'`).Scan(&status, &last4, &expYear, &detachedAt, &cardUpdatedAt))
	require.Equal(t, "detached", status)
	require.Equal(t, "2222", last4, "the newest card details win whatever the delivery order")
	require.Equal(t, 2032, expYear)
	require.True(t, detachedAt.Equal(t0.Add(30*time.Second)), "detached at the event's time, %v", detachedAt)
	require.True(t, cardUpdatedAt.Equal(t0.Add(20*time.Second)))
	require.NoError(t, h.pool.QueryRow(ctx, `select default_payment_method_id from billing.customers where id = $1`, c.ID).Scan(&defaultMethod))
	require.Nil(t, defaultMethod, "a detached method is no longer the default")

	require.NoError(t, h.pool.QueryRow(ctx, `select (select count(*) from billing.webhook_events),
		(select count(*) from river_job where kind = 'ingest_event' and state = 'completed' and attempt = 1)`).Scan(&events, &ingests))
	require.Equal(t, 6, events, "each event stored once")
	require.Equal(t, 6, ingests, "each event ingested once, at the first attempt")

	for id, want := range map[string]string{
		"evt_upd_1": "processed", "evt_upd_2": "processed", "evt_det": "processed",
		"evt_det_unknown": "unknown_object", "evt_upd_unknown": "unknown_object", "evt_other": "ignored",
	} {
		got, note := h.eventStatus(t, id)
		require.Equal(t, want, got, "%s: %s", id, note)
	}
}

func TestCheckoutSessionExpiredMarksKnownSessions(t *testing.T) {
	t.Parallel()
	h := newHarness(t, harnessOpts{})
	ctx := context.Background()
	c := dbtest.NewCustomer(t, h.pool, dbtest.CustomerOpts{Ref: "bob"})
	_, err := h.pool.Exec(ctx, `insert into billing.setup_sessions (customer_id, usage, terms_version, currency, status, checkout_session_id, url, expires_at, completed_at)
		values ($1, '{adhoc}', 'v1', 'usd', 'open', 'cs_test_setup_open', 'https://x/1', now(), null),
		       ($1, '{adhoc}', 'v1', 'usd', 'completed', 'cs_test_setup_done', 'https://x/2', now(), now())`, c.ID)
	require.NoError(t, err)
	var chargeID int64
	require.NoError(t, h.pool.QueryRow(ctx, `insert into billing.charges (customer_id, source, amount, currency, description, requested_by, status)
		values ($1, 'adhoc', 500, 'usd', 'fee', 'finance', 'recovering') returning id`, c.ID).Scan(&chargeID))
	_, err = h.pool.Exec(ctx, `insert into billing.recoveries (charge_id, token, reason) values ($1, repeat('t', 40), 'card_declined');
		`, chargeID)
	require.NoError(t, err)
	_, err = h.pool.Exec(ctx, `insert into billing.recovery_sessions (charge_id, round, checkout_session_id, url, expires_at)
		values ($1, 1, 'cs_test_recovery', 'https://x/3', now())`, chargeID)
	require.NoError(t, err)

	now := time.Now()
	object := func(id, mode string) map[string]any {
		return map[string]any{"id": id, "object": "checkout.session", "mode": mode, "status": "expired"}
	}
	for _, b := range shuffled(t,
		eventJSON(t, "evt_exp_setup", "checkout.session.expired", now, object("cs_test_setup_open", "setup")),
		eventJSON(t, "evt_exp_done", "checkout.session.expired", now, object("cs_test_setup_done", "setup")),
		eventJSON(t, "evt_exp_recovery", "checkout.session.expired", now, object("cs_test_recovery", "payment")),
		eventJSON(t, "evt_exp_unknown", "checkout.session.expired", now, object("cs_test_nobody", "setup")),
	) {
		h.deliver(t, b)
	}
	h.waitJobs(t, "ingest_event")

	statuses := map[string]string{}
	rows, err := h.pool.Query(ctx, `select checkout_session_id, status from billing.setup_sessions
		union all select checkout_session_id, status from billing.recovery_sessions`)
	require.NoError(t, err)
	for rows.Next() {
		var id, s string
		require.NoError(t, rows.Scan(&id, &s))
		statuses[id] = s
	}
	require.NoError(t, rows.Err())
	require.Equal(t, map[string]string{
		"cs_test_setup_open": "expired",
		"cs_test_setup_done": "completed", // a completed session does not expire
		"cs_test_recovery":   "expired",
	}, statuses)
	for id, want := range map[string]string{
		"evt_exp_setup": "processed", "evt_exp_done": "processed", "evt_exp_recovery": "processed", "evt_exp_unknown": "unknown_object",
	} {
		got, note := h.eventStatus(t, id)
		require.Equal(t, want, got, "%s: %s", id, note)
	}
}

// The two contracts implemented by other branches (SettlePaymentIntentTx: charge;
// RecoveryPaidTx: recovery) are checked only for dispatch here: the event reaches the contract
// (its error is surfaced and the job retried while it is a stub; once implemented, an unknown
// charge is reported as unknown_object with the note only that path writes). Objects that are not
// billingd's (no charge_id) are ignored without calling them.
func TestPaymentEventsAreDispatchedToTheirContracts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, harnessOpts{})
	ctx := context.Background()
	now := time.Now()
	pi := func(id string, meta map[string]string) map[string]any {
		return map[string]any{"id": id, "object": "payment_intent", "status": "succeeded", "amount": 500, "currency": "usd", "metadata": meta}
	}
	cs := func(id string, meta map[string]string) map[string]any {
		return map[string]any{"id": id, "object": "checkout.session", "mode": "payment", "status": "complete", "metadata": meta}
	}
	h.deliver(t, eventJSON(t, "evt_pi_ok", "payment_intent.succeeded", now, pi("pi_1", map[string]string{"charge_id": "987654"})))
	h.deliver(t, eventJSON(t, "evt_pi_fail", "payment_intent.payment_failed", now, pi("pi_2", map[string]string{"charge_id": "987655"})))
	h.deliver(t, eventJSON(t, "evt_pi_foreign", "payment_intent.succeeded", now, pi("pi_3", nil)))
	h.deliver(t, eventJSON(t, "evt_cs_paid", "checkout.session.completed", now, cs("cs_test_pay", map[string]string{"charge_id": "987656"})))
	h.deliver(t, eventJSON(t, "evt_cs_foreign", "checkout.session.completed", now, cs("cs_test_other", nil)))
	h.waitJobs(t, "ingest_event")

	dispatched := func(eventID, errPart, notePart string) {
		t.Helper()
		status, note := h.eventStatus(t, eventID)
		if status == "received" {
			var errs []string
			require.NoError(t, h.pool.QueryRow(ctx, `select coalesce(array_agg(e->>'error'), '{}') from river_job, jsonb_array_elements(to_jsonb(errors)) e
				where kind = 'ingest_event' and args->>'event_id' = $1`, eventID).Scan(&errs))
			require.NotEmpty(t, errs, "%s: still received, so its job must have failed", eventID)
			require.Contains(t, errs[0], errPart)
			return
		}
		require.Equal(t, "unknown_object", status, eventID)
		require.Contains(t, note, notePart)
	}
	dispatched("evt_pi_ok", "settle payment intent pi_1", "no charge known")
	dispatched("evt_pi_fail", "settle payment intent pi_2", "no charge known")
	dispatched("evt_cs_paid", "recovery paid by session cs_test_pay", "no recovery known")

	for _, id := range []string{"evt_pi_foreign", "evt_cs_foreign"} {
		status, note := h.eventStatus(t, id)
		require.Equal(t, "ignored", status, id)
		require.True(t, strings.Contains(note, "not billingd's"), note)
	}
}
