package jobs_test

// Two installations (two databases) sharing one Stripe account: each has its own charge 1, and
// neither may take the other's PaymentIntent for its own, nor collide with its idempotency keys.

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"
	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/billingd/billingd/stripefake"
	"github.com/billingd/billingd/worker"
)

// renewInstallationQuery gives a database a new installation id, as the README tells an operator
// to do on a copy of a database that talks to the same Stripe account.
const renewInstallationQuery = `update billing.installation set id = gen_random_uuid(), assigned_at = now()`

// twoInstallations returns two environments, each with its own database, sharing one stripefake
// (one Stripe account). Test databases are clones of one template, and so are copies of one
// database: the second gets a new installation id as the README says.
func twoInstallations(t *testing.T, o envOpts) (a, b *env) {
	t.Helper()
	fake := stripefake.New(o.Fake...)
	t.Cleanup(fake.Close)
	o.SharedFake = fake
	a, b = newEnv(t, o), newEnv(t, o)
	_, err := b.Pool.Exec(context.Background(), renewInstallationQuery)
	require.NoError(t, err)
	require.NotEqual(t, a.installation(), b.installation())
	return a, b
}

// Both installations collect their charge 1, each with its own key, its own customer and its own
// PaymentIntent.
func TestInstallationsSharingAStripeAccountChargeApart(t *testing.T) {
	t.Parallel()
	a, b := twoInstallations(t, envOpts{})
	// The same application runs twice: the same customer_ref in both.
	ca, cb := a.customer("ada", "pm_card_visa"), b.customer("ada", "pm_card_visa")
	require.NotEqual(t, ca.StripeID, cb.StripeID, "each installation has its own Stripe customer for ada")
	ida, idb := a.charge(ca, 1500, "usd"), b.charge(cb, 2500, "usd")
	require.Equal(t, ida, idb, "both databases have the same charge id")
	a.start()
	b.start()
	sa, sb := a.waitStatus(ida, "succeeded", 20*time.Second), b.waitStatus(idb, "succeeded", 20*time.Second)

	aa, ab := a.attempts(ida), b.attempts(idb)
	require.Len(t, aa, 1)
	require.Len(t, ab, 1)
	require.NotEqual(t, aa[0].Key, ab[0].Key)
	require.NotEqual(t, *sa.PaymentIntent, *sb.PaymentIntent)
	for _, c := range []struct {
		e        *env
		pi       string
		amount   int64
		customer string
	}{{a, *sa.PaymentIntent, 1500, ca.StripeID}, {b, *sb.PaymentIntent, 2500, cb.StripeID}} {
		pi, ok := c.e.Fake.PaymentIntent(c.pi)
		require.True(t, ok)
		require.Equal(t, c.amount, pi.Amount, "the charge settled from its own PaymentIntent")
		require.Equal(t, c.customer, pi.Customer)
		require.Equal(t, c.e.installation(), pi.Metadata["billingd_installation"])
	}
	require.Equal(t, 2, a.Fake.SuccessfulCharges(itoa(ida)), "one payment for each installation's charge 1")
}

// A webhook event about installation A's PaymentIntent, delivered to B's endpoint (one account,
// two endpoints), leaves B's charge of the same id untouched and is recorded as ignored.
func TestWebhookOfAnotherInstallationIsIgnored(t *testing.T) {
	t.Parallel()
	// Reconcile is kept away from B, so that only the webhook could settle its charge.
	a, b := twoInstallations(t, envOpts{Flags: []string{"-reconcile-after", "1h", "-reconcile-schedule", "0 0 1 1 *"}})
	ida := a.charge(a.customer("ada", "pm_card_visa"), 1500, "usd")
	cb := b.customer("bob", "pm_card_visa")
	idb := b.crashedAttempt(cb, 1500, 10*time.Second) // in flight: a late webhook would settle it
	require.Equal(t, ida, idb)
	a.start()
	b.start()
	a.waitStatus(ida, "succeeded", 20*time.Second)

	var event *stripefake.Event
	for _, ev := range a.Fake.Events() {
		if ev.Type == string(stripe.EventTypePaymentIntentSucceeded) {
			event = &ev
		}
	}
	require.NotNil(t, event, "stripefake emitted payment_intent.succeeded for A's charge")
	b.deliver(event.Payload)
	require.Eventually(t, func() bool {
		return scalar[string](t, b.Pool, `select status from billing.webhook_events where id = $1`, event.ID) != "received"
	}, 20*time.Second, 20*time.Millisecond)
	status := scalar[string](t, b.Pool, `select status from billing.webhook_events where id = $1`, event.ID)
	note := scalar[string](t, b.Pool, `select coalesce(note, '') from billing.webhook_events where id = $1`, event.ID)
	require.Equal(t, "ignored", status, note)
	require.Contains(t, note, a.installation())

	st := b.chargeState(idb)
	require.Equal(t, "processing", st.Status, "B's charge is not settled by A's payment")
	require.Nil(t, st.PaymentIntent)
	ab := b.attempts(idb)
	require.Len(t, ab, 1)
	require.Equal(t, "in_flight", ab[0].Outcome)
	require.Nil(t, ab[0].PI)
}

// B's reconcile searches for the PaymentIntent of its lost attempt 1 of charge 1; A's
// PaymentIntent for its own charge 1, attempt 1, in the same account, is not taken for it.
func TestReconcileIgnoresAnotherInstallationsPaymentIntent(t *testing.T) {
	t.Parallel()
	a, b := twoInstallations(t, envOpts{})
	ida := a.charge(a.customer("ada", "pm_card_visa"), 1500, "usd")
	a.start()
	sa := a.waitStatus(ida, "succeeded", 20*time.Second)

	// B's attempt 1 was lost so long ago that its key expired: only search can tell.
	cb := b.customer("bob", "pm_card_visa")
	idb := b.crashedAttempt(cb, 2500, 26*time.Hour)
	require.Equal(t, ida, idb)
	b.start()
	sb := b.waitStatus(idb, "succeeded", 20*time.Second)
	require.NotEqual(t, *sa.PaymentIntent, *sb.PaymentIntent, "B's charge is not settled by A's payment")
	as := b.attempts(idb)
	require.Len(t, as, 2, "nothing found for attempt 1: B charges its own card with attempt 2")
	require.Equal(t, "failed", as[0].Outcome)
	require.Nil(t, as[0].PI)
	pi, ok := b.Fake.PaymentIntent(*sb.PaymentIntent)
	require.True(t, ok)
	require.Equal(t, cb.StripeID, pi.Customer)
	require.Equal(t, int64(2500), pi.Amount)
}

// An attempt recorded by a billingd whose keys did not name the installation, and whose request
// reached Stripe, is replayed after the upgrade with its stored key and the very request it was
// first sent as (no billingd_installation), so Stripe returns the first answer instead of an
// idempotency_error.
func TestReconcileReplaysAnAttemptFromBeforeInstallations(t *testing.T) {
	t.Parallel()
	// Search lags: the replay of the key, not search, must settle the attempt.
	e := newEnv(t, envOpts{Fake: []stripefake.Option{stripefake.WithSearchLag(time.Hour)}})
	c := e.customer("legacy", "pm_card_visa")
	id := e.crashedAttemptWithKey(c, 3100, 10*time.Second, legacyKey)
	first := e.createPaymentIntent(c, 3100, map[string]string{"charge_id": itoa(id), "source": "adhoc", "charge_attempt": "1"}, legacyKey(id))
	e.start()
	st := e.waitStatus(id, "succeeded", 20*time.Second)
	require.Equal(t, first.ID, *st.PaymentIntent)
	as := e.attempts(id)
	require.Len(t, as, 1)
	require.Equal(t, legacyKey(id), as[0].Key, "the stored key is sent again as stored")
	require.Equal(t, []string{legacyKey(id), legacyKey(id)}, e.Front.createKeys())
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
}

// deliver posts a signed event to the environment's webhook handler (as the daemon serves it),
// as Stripe does, and requires a 2xx.
func (e *env) deliver(body []byte) {
	e.t.Helper()
	hooks := httptest.NewServer(worker.NewWebhooks(e.Pool, e.Client, e.Config.StripeWebhookSecret, e.Logger))
	defer hooks.Close()
	req, err := http.NewRequest(http.MethodPost, hooks.URL, bytes.NewReader(body))
	require.NoError(e.t, err)
	sig := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: body, Secret: e.Config.StripeWebhookSecret})
	req.Header.Set("Stripe-Signature", sig.Header)
	resp, err := hooks.Client().Do(req)
	require.NoError(e.t, err)
	defer resp.Body.Close()
	require.Equal(e.t, http.StatusOK, resp.StatusCode)
}
