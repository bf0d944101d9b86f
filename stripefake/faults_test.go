package stripefake_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/stripefake"
)

func TestFault500Before(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	b.fake.InjectFaults(stripefake.KindCreatePaymentIntent, 1, stripefake.Fault{Kind: stripefake.Fault500Before})

	_, err := b.charge(t, cus, "pm_card_visa", 1000, "f1", "key-f1")
	se := stripeErr(t, err)
	require.Equal(t, 500, se.HTTPStatusCode)
	require.Equal(t, stripe.ErrorTypeAPI, se.Type)
	require.Equal(t, "false", se.LastResponse.Header.Get("Stripe-Should-Retry"))
	require.Empty(t, b.fake.PaymentIntentsByMetadata("charge_id", "f1"), "nothing was done")

	_, err = b.charge(t, cus, "pm_card_visa", 1000, "f1", "key-f1")
	se = stripeErr(t, err)
	require.Equal(t, 500, se.HTTPStatusCode, "Stripe replays a stored 500")
	require.Equal(t, "true", se.LastResponse.Header.Get("Idempotent-Replayed"))

	pi, err := b.charge(t, cus, "pm_card_visa", 1000, "f1", "key-f1-b")
	require.NoError(t, err)
	require.Equal(t, stripe.PaymentIntentStatusSucceeded, pi.Status)
}

func TestFault500After(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	b.fake.InjectFaults(stripefake.KindCreatePaymentIntent, 1, stripefake.Fault{Kind: stripefake.Fault500After})

	_, err := b.charge(t, cus, "pm_card_visa", 1000, "f2", "key-f2")
	require.Equal(t, 500, stripeErr(t, err).HTTPStatusCode)
	pis := b.fake.PaymentIntentsByMetadata("charge_id", "f2")
	require.Len(t, pis, 1, "the work was done")
	require.Equal(t, "succeeded", pis[0].Status)

	_, err = b.charge(t, cus, "pm_card_visa", 1000, "f2", "key-f2")
	require.Equal(t, 500, stripeErr(t, err).HTTPStatusCode, "the key replays the 500, not the outcome")

	var found []*stripe.PaymentIntent
	for pi, err := range b.sc.V1PaymentIntents.Search(t.Context(), stripeapi.PaymentIntentSearchByCharge("", "f2")) {
		require.NoError(t, err)
		found = append(found, pi)
	}
	require.Len(t, found, 1, "search finds the lost outcome")
	require.Equal(t, pis[0].ID, found[0].ID)
	require.Equal(t, 1, b.fake.SuccessfulCharges("f2"))
}

func TestFaultDropAfter(t *testing.T) {
	t.Parallel()

	t.Run("client sees an error, the key replays the outcome", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		cus := b.customer(t)
		// A fresh connection per request: Go's transport would otherwise
		// resend an idempotent request that died on a reused connection.
		client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
		sc := stripeapi.NewClient(testKey, b.srv.URL, client, 0)
		b.fake.InjectFaults(stripefake.KindCreatePaymentIntent, 1, stripefake.Fault{Kind: stripefake.FaultDropAfter})

		p := stripeapi.OffSessionPaymentIntent(cus, "pm_card_visa", 1000, "usd", "", map[string]string{"charge_id": "f3"}, "key-f3")
		_, err := sc.V1PaymentIntents.Create(t.Context(), p)
		require.Error(t, err)
		var se *stripe.Error
		require.NotErrorAs(t, err, &se, "a dropped connection is not a Stripe answer")
		pis := b.fake.PaymentIntentsByMetadata("charge_id", "f3")
		require.Len(t, pis, 1)
		require.Equal(t, "succeeded", pis[0].Status)

		pi, err := sc.V1PaymentIntents.Create(t.Context(),
			stripeapi.OffSessionPaymentIntent(cus, "pm_card_visa", 1000, "usd", "", map[string]string{"charge_id": "f3"}, "key-f3"))
		require.NoError(t, err)
		require.Equal(t, pis[0].ID, pi.ID)
		require.Equal(t, "true", pi.LastResponse.Header.Get("Idempotent-Replayed"))
		require.Equal(t, 1, b.fake.SuccessfulCharges("f3"))
	})

	t.Run("stripe-go's network retry recovers it", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		cus := b.customer(t)
		client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
		sc := stripeapi.NewClient(testKey, b.srv.URL, client, 2)
		b.fake.InjectFaults(stripefake.KindCreatePaymentIntent, 1, stripefake.Fault{Kind: stripefake.FaultDropAfter})
		pi, err := sc.V1PaymentIntents.Create(t.Context(),
			stripeapi.OffSessionPaymentIntent(cus, "pm_card_visa", 1000, "usd", "", map[string]string{"charge_id": "f4"}, "key-f4"))
		require.NoError(t, err)
		require.Equal(t, "true", pi.LastResponse.Header.Get("Idempotent-Replayed"))
		require.Equal(t, int64(2), b.fake.RequestCount(stripefake.KindCreatePaymentIntent))
		require.Equal(t, 1, b.fake.SuccessfulCharges("f4"))
	})
}

func TestFaultLatency(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.fake.InjectFaults(stripefake.KindCreateCustomer, 1, stripefake.Fault{Latency: 150 * time.Millisecond})
	start := time.Now()
	b.customer(t)
	require.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond)
	start = time.Now()
	b.customer(t)
	require.Less(t, time.Since(start), 150*time.Millisecond, "the script is used up")
}

func TestFaultRate(t *testing.T) {
	t.Parallel()
	run := func(seed uint64) []bool {
		b := setup(t, stripefake.WithSeed(seed))
		b.fake.SetFaultRate("*", stripefake.Fault{Kind: stripefake.Fault500Before}, 0.5)
		var failed []bool
		for range 40 {
			_, err := b.sc.V1Customers.Create(t.Context(), nil)
			failed = append(failed, err != nil)
		}
		return failed
	}
	a := run(7)
	n := 0
	for _, f := range a {
		if f {
			n++
		}
	}
	require.Greater(t, n, 5)
	require.Less(t, n, 35)
	require.Equal(t, a, run(7), "the same seed gives the same faults")

	b := setup(t)
	b.fake.SetFaultRate(stripefake.KindCreateCustomer, stripefake.Fault{Kind: stripefake.Fault500Before}, 1)
	_, err := b.sc.V1Customers.Create(t.Context(), nil)
	require.Equal(t, 500, stripeErr(t, err).HTTPStatusCode)
	b.fake.ClearFaults()
	_, err = b.sc.V1Customers.Create(t.Context(), nil)
	require.NoError(t, err)

	require.Panics(t, func() { b.fake.InjectFaults("POST /v1/nope", 1, stripefake.Fault{}) })
}

func TestRateLimit(t *testing.T) {
	t.Parallel()
	b := setup(t, stripefake.WithRateLimit(1, 3))
	ok, limited := 0, 0
	for range 10 {
		_, err := b.sc.V1Customers.Create(t.Context(), nil)
		if err == nil {
			ok++
			continue
		}
		se := stripeErr(t, err)
		require.Equal(t, 429, se.HTTPStatusCode)
		require.Equal(t, stripe.ErrorCodeRateLimit, se.Code)
		require.Equal(t, stripe.ErrorTypeInvalidRequest, se.Type)
		limited++
	}
	require.GreaterOrEqual(t, ok, 3)
	require.LessOrEqual(t, ok, 4)
	require.Equal(t, 10-ok, limited)

	b.fake.SetRateLimit(0, 0)
	for range 10 {
		_, err := b.sc.V1Customers.Create(t.Context(), nil)
		require.NoError(t, err)
	}
}
