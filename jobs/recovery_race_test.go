package jobs_test

import (
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/stripefake"
)

// The race tests: an automatic retry and the recovery page must never both keep the customer's
// money. Each ends with exactly one collection per charge: stripefake's collected minus refunded
// equals the charge's amount.

// openSession returns the charge's open recovery session at stripefake.
func (b *bundle) openSession(t *testing.T, chargeID int64) stripefake.CheckoutSession {
	t.Helper()
	for _, s := range b.fakeSessions(chargeID) {
		if s.Status == "open" {
			return s
		}
	}
	t.Fatalf("charge %d has no open session", chargeID)
	return stripefake.CheckoutSession{}
}

// net is what stripefake kept for the charge: succeeded PaymentIntents minus their refunds.
func (b *bundle) net(chargeID int64) int64 {
	var n int64
	for _, pi := range b.fake.PaymentIntentsByMetadata(stripefake.MetadataChargeID, strconv.FormatInt(chargeID, 10)) {
		if pi.Status == "succeeded" {
			n += pi.AmountReceived - pi.AmountRefunded
		}
	}
	return n
}

// The retry succeeds first: the open page is expired, so the customer cannot pay again.
func TestRaceRetrySucceedsFirst(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	ctx := t.Context()
	cust := b.stripeCustomer(t, "fay", savedCard)
	charge := newCharge(t, b.pool, cust.ID, 5000, "jpy", "Installment 3 of 6", "processing")
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.declineTo(t, cust, charge, "retry_scheduled")))
	page := b.openSession(t, charge)
	token := scalar[string](t, b.pool, `select token from billing.recoveries where charge_id = $1`, charge)

	require.True(t, b.startAttempt(t, charge))
	b.settleCollected(t, charge, b.collect(t, cust, charge, "pm_card_visa"), nil)
	requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "expire_recovery", nil))

	err := b.fake.CompleteCheckoutSession(ctx, page.ID, "pm_card_mastercard")
	require.ErrorIs(t, err, stripefake.ErrSessionNotOpen, "the page no longer takes money")
	got, _ := b.fake.CheckoutSession(page.ID)
	require.Equal(t, "expired", got.Status)
	require.Equal(t, "expired", scalar[string](t, b.pool, `select status from billing.recovery_sessions where checkout_session_id = $1`, page.ID))
	require.Equal(t, "closed", scalar[string](t, b.pool, `select status from billing.recoveries where charge_id = $1`, charge))
	link, err := jobs.ResolveRecoveryLink(ctx, b.deps, b.client, token)
	require.NoError(t, err)
	require.Equal(t, jobs.LinkPaid, link.Outcome)

	require.EqualValues(t, 5000, b.net(charge))
	require.Equal(t, 1, b.fake.SuccessfulCharges(strconv.FormatInt(charge, 10)))
	require.Equal(t, 0, scalar[int](t, b.pool, `select count(*) from billing.refunds`))
}

// The retry succeeds while the customer is paying the page: both take money at Stripe; the
// recovery payment arrives second and is refunded automatically, once, and recorded.
func TestRaceRetryAndPageAtOnce(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	ctx := t.Context()
	cust := b.stripeCustomer(t, "gus", savedCard)
	charge := newCharge(t, b.pool, cust.ID, 1099, "usd", "Top-up", "processing")
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.declineTo(t, cust, charge, "retry_scheduled")))
	page := b.openSession(t, charge)

	require.True(t, b.startAttempt(t, charge))
	pi := b.collect(t, cust, charge, "pm_card_visa")
	b.settleCollected(t, charge, pi, func() {
		// The customer pays while the retry's success is being recorded (the charge is locked).
		require.NoError(t, b.fake.CompleteCheckoutSession(ctx, page.ID, "pm_card_mastercard"))
	})
	requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "refund_payment", nil))
	requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "expire_recovery", nil))
	require.NoError(t, b.fake.WaitForDeliveries(ctx))

	require.Equal(t, "succeeded", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, charge))
	require.Equal(t, 2, b.fake.SuccessfulCharges(strconv.FormatInt(charge, 10)), "Stripe took the money twice")
	require.EqualValues(t, 1099, b.net(charge), "and kept it once")
	require.Equal(t, stripefake.Totals{Collected: 2198, Refunded: 1099}, b.fake.Totals()["usd"])
	paid, _ := b.fake.CheckoutSession(page.ID)
	var refunded, reason, status string
	require.NoError(t, b.pool.QueryRow(ctx, `select payment_intent_id, reason, status from billing.refunds where charge_id = $1`, charge).
		Scan(&refunded, &reason, &status))
	require.Equal(t, paid.PaymentIntent, refunded, "the later payment, the page's, is the one refunded")
	require.Equal(t, "already_collected", reason)
	require.Equal(t, "succeeded", status)
	require.Equal(t, 1, scalar[int](t, b.pool, `select count(*) from billing.refunds`))
	b.requireEventsProcessed(t)
}

// The page is paid first, while an automatic attempt is in flight: the charge is recovered, and
// when the attempt's success arrives, that later payment is refunded. A retry that had not
// started does not start.
func TestRaceRecoveryPaidFirst(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	ctx := t.Context()
	cust := b.stripeCustomer(t, "hal", savedCard)

	inFlight := newCharge(t, b.pool, cust.ID, 2500, "gbp", "Plan", "processing")
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.declineTo(t, cust, inFlight, "retry_scheduled")))
	page := b.openSession(t, inFlight)
	require.True(t, b.startAttempt(t, inFlight))
	pi := b.collect(t, cust, inFlight, "pm_card_visa") // the attempt's answer is on its way
	require.NoError(t, b.fake.CompleteCheckoutSession(ctx, page.ID, "pm_card_mastercard"))
	requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "adopt_payment_method", nil))
	require.Equal(t, "recovered", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, inFlight))
	b.settleCollected(t, inFlight, pi, nil)
	requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "refund_payment", nil))
	require.Equal(t, "recovered", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, inFlight))
	require.EqualValues(t, 2500, b.net(inFlight))
	require.Equal(t, pi.ID, scalar[string](t, b.pool, `select payment_intent_id from billing.refunds where charge_id = $1 and status = 'succeeded'`, inFlight))

	waiting := newCharge(t, b.pool, cust.ID, 700, "gbp", "Plan", "processing")
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.declineTo(t, cust, waiting, "retry_scheduled")))
	require.NoError(t, b.fake.CompleteCheckoutSession(ctx, b.openSession(t, waiting).ID, "pm_card_visa"))
	requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "adopt_payment_method", nil))
	require.Equal(t, "recovered", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, waiting))
	require.True(t, scalar[bool](t, b.pool, `select next_attempt_at is null from billing.charges where id = $1`, waiting), "retries stop")
	require.False(t, b.startAttempt(t, waiting), "the scheduled retry finds nothing due")
	require.EqualValues(t, 700, b.net(waiting))
	require.Equal(t, 1, b.fake.SuccessfulCharges(strconv.FormatInt(waiting, 10)))
}

// Many charges, each with an automatic retry and the customer's payment racing freely: every
// charge ends with exactly one collection kept.
func TestRaceManyCharges(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	ctx := t.Context()
	const n = 8
	type item struct {
		cust   dbtest.Customer
		charge int64
		page   string
	}
	items := make([]item, n)
	for i := range items {
		cust := b.stripeCustomer(t, "race"+strconv.Itoa(i), savedCard)
		charge := newCharge(t, b.pool, cust.ID, int64(1000+10*i), "eur", "Plan", "processing")
		requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.declineTo(t, cust, charge, "retry_scheduled")))
		items[i] = item{cust: cust, charge: charge, page: b.openSession(t, charge).ID}
	}

	var wg sync.WaitGroup
	payErrs := make([]error, n)
	for i, it := range items {
		wg.Add(2)
		retried := make(chan struct{})
		go func() { // the customer: at once, or a second after the retry (half of them)
			defer wg.Done()
			if i%2 == 1 {
				<-retried
				time.Sleep(time.Second)
			}
			payErrs[i] = b.fake.CompleteCheckoutSession(ctx, it.page, "pm_card_visa")
		}()
		go func() { // the automatic retry
			defer wg.Done()
			defer close(retried)
			if b.startAttempt(t, it.charge) {
				b.settleCollected(t, it.charge, b.collect(t, it.cust, it.charge, "pm_card_visa"), nil)
			}
		}()
	}
	wg.Wait()
	for _, err := range payErrs {
		if err != nil {
			require.ErrorIs(t, err, stripefake.ErrSessionNotOpen, "the page may have been expired first")
		}
	}
	require.NoError(t, b.fake.WaitForDeliveries(ctx))
	require.Eventually(t, func() bool {
		for i, it := range items {
			if b.net(it.charge) != int64(1000+10*i) {
				return false
			}
		}
		return scalar[int](t, b.pool, `select count(*) from billing.refunds where status <> 'succeeded'`) == 0 &&
			scalar[int](t, b.pool, `select count(*) from river_job where state not in ('completed', 'cancelled', 'discarded') and kind <> 'recovery_sweep'`) == 0
	}, 30*time.Second, 50*time.Millisecond, "every charge keeps exactly its amount")
	for i, it := range items {
		require.EqualValues(t, 1000+10*i, b.net(it.charge), "charge %d", it.charge)
		status := scalar[string](t, b.pool, `select status from billing.charges where id = $1`, it.charge)
		require.Contains(t, []string{"succeeded", "recovered"}, status)
		require.NotEqual(t, "open", scalar[string](t, b.pool, `select status from billing.recoveries where charge_id = $1`, it.charge))
	}
	b.requireEventsProcessed(t)
	expiredFirst := 0
	for _, err := range payErrs {
		if err != nil {
			expiredFirst++
		}
	}
	t.Logf("%d charges: %d pages expired before the customer paid, %d second payments refunded",
		n, expiredFirst, scalar[int](t, b.pool, `select count(*) from billing.refunds`))
}
