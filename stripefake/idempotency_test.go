package stripefake_test

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/stripefake"
)

func TestIdempotentReplay(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)

	first, err := b.charge(t, cus, "pm_card_visa", 1000, "i1", "key-i1")
	require.NoError(t, err)
	require.Empty(t, first.LastResponse.Header.Get("Idempotent-Replayed"))
	again, err := b.charge(t, cus, "pm_card_visa", 1000, "i1", "key-i1")
	require.NoError(t, err)
	require.Equal(t, "true", again.LastResponse.Header.Get("Idempotent-Replayed"))
	require.Equal(t, first.ID, again.ID)
	require.Equal(t, first.LastResponse.RequestID, again.LastResponse.Header.Get("Original-Request"))

	require.Len(t, b.fake.PaymentIntentsByMetadata("charge_id", "i1"), 1)
	require.Equal(t, 1, b.fake.SuccessfulCharges("i1"))
	require.Equal(t, int64(2), b.fake.RequestCount(stripefake.KindCreatePaymentIntent))
}

func TestIdempotentDeclineIsReplayed(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	_, err := b.charge(t, cus, "pm_card_chargeDeclinedInsufficientFunds", 1000, "i2", "key-i2")
	first := stripeErr(t, err)
	_, err = b.charge(t, cus, "pm_card_chargeDeclinedInsufficientFunds", 1000, "i2", "key-i2")
	again := stripeErr(t, err)
	require.Equal(t, 402, again.HTTPStatusCode)
	require.Equal(t, first.PaymentIntent.ID, again.PaymentIntent.ID)
	require.Equal(t, "true", again.LastResponse.Header.Get("Idempotent-Replayed"))
	require.Len(t, b.fake.PaymentIntentsByMetadata("charge_id", "i2"), 1, "a business retry needs a new key")
}

func TestIdempotencyKeyWithOtherParams(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	_, err := b.charge(t, cus, "pm_card_visa", 1000, "i3", "key-i3")
	require.NoError(t, err)
	_, err = b.charge(t, cus, "pm_card_visa", 2000, "i3", "key-i3")
	se := stripeErr(t, err)
	require.Equal(t, 400, se.HTTPStatusCode)
	require.Equal(t, stripe.ErrorTypeIdempotency, se.Type)
	var ie *stripe.IdempotencyError
	require.ErrorAs(t, err, &ie)

	// The same key on another endpoint is another request too.
	_, err = b.sc.V1Refunds.Create(t.Context(), stripeapi.Refund("pi_x", 0, nil, "key-i3"))
	require.Equal(t, stripe.ErrorTypeIdempotency, stripeErr(t, err).Type)
}

func TestIdempotencyKeyInFlight(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	b.fake.InjectFaults(stripefake.KindCreatePaymentIntent, 1, stripefake.Fault{Latency: 400 * time.Millisecond})

	var wg sync.WaitGroup
	var first *stripe.PaymentIntent
	var firstErr error
	wg.Go(func() { first, firstErr = b.charge(t, cus, "pm_card_visa", 1000, "i4", "key-i4") })
	eventually(t, func() bool { return b.fake.InFlightRequests() == 1 }, "first request in flight")

	_, err := b.charge(t, cus, "pm_card_visa", 1000, "i4", "key-i4")
	se := stripeErr(t, err)
	require.Equal(t, 409, se.HTTPStatusCode)
	require.Equal(t, stripe.ErrorTypeIdempotency, se.Type)
	require.Equal(t, stripe.ErrorCodeIdempotencyKeyInUse, se.Code)
	require.Equal(t, "true", se.LastResponse.Header.Get("Stripe-Should-Retry"))

	wg.Wait()
	require.NoError(t, firstErr)
	again, err := b.charge(t, cus, "pm_card_visa", 1000, "i4", "key-i4")
	require.NoError(t, err)
	require.Equal(t, first.ID, again.ID)
	require.Equal(t, 1, b.fake.SuccessfulCharges("i4"))
}

func TestIdempotencyInvalidRequestNotStored(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	p := stripeapi.OffSessionPaymentIntent(cus, "pm_card_visa", 1000, "usd", "", map[string]string{"charge_id": "i5"}, "key-i5")
	p.AddExtra("colour", "blue")
	_, err := b.sc.V1PaymentIntents.Create(t.Context(), p)
	require.Equal(t, stripe.ErrorCodeParameterUnknown, stripeErr(t, err).Code)

	pi, err := b.charge(t, cus, "pm_card_visa", 1000, "i5", "key-i5")
	require.NoError(t, err, "a request that failed validation stores no result")
	require.Empty(t, pi.LastResponse.Header.Get("Idempotent-Replayed"))
}

func TestIdempotencyKeysExpire(t *testing.T) {
	t.Parallel()

	t.Run("ExpireIdempotencyKeys", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		cus := b.customer(t)
		first, err := b.charge(t, cus, "pm_card_visa", 1000, "i6", "key-i6")
		require.NoError(t, err)
		b.fake.ExpireIdempotencyKeys()
		second, err := b.charge(t, cus, "pm_card_visa", 1000, "i6", "key-i6")
		require.NoError(t, err)
		require.NotEqual(t, first.ID, second.ID, "after the window the key executes anew")
		require.Equal(t, 2, b.fake.SuccessfulCharges("i6"))
	})

	t.Run("clock passes the TTL", func(t *testing.T) {
		t.Parallel()
		clock := newClock()
		b := setup(t, stripefake.WithClock(clock.Now), stripefake.WithIdempotencyTTL(24*time.Hour))
		cus := b.customer(t)
		first, err := b.charge(t, cus, "pm_card_visa", 1000, "i7", "key-i7")
		require.NoError(t, err)
		clock.Advance(23 * time.Hour)
		again, err := b.charge(t, cus, "pm_card_visa", 1000, "i7", "key-i7")
		require.NoError(t, err)
		require.Equal(t, first.ID, again.ID)
		clock.Advance(2 * time.Hour)
		later, err := b.charge(t, cus, "pm_card_visa", 1000, "i7", "key-i7")
		require.NoError(t, err)
		require.NotEqual(t, first.ID, later.ID)
	})
}

func TestIdempotencyKeysArePerAPIKey(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	other := stripeapi.NewClient("sk_test_other", b.srv.URL, b.srv.Client(), 0)
	a, err := b.charge(t, cus, "pm_card_visa", 1000, "i8", "shared-key")
	require.NoError(t, err)
	o, err := other.V1PaymentIntents.Create(t.Context(), stripeapi.OffSessionPaymentIntent(cus, "pm_card_visa", 3000, "usd", "", nil, "shared-key"))
	require.NoError(t, err)
	require.NotEqual(t, a.ID, o.ID)
}

// clock is a settable test clock.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Now()} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}
