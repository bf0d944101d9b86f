package stripefake_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/stripefake"
)

func TestChargeSucceeds(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)

	pi, err := b.charge(t, cus, "pm_card_visa", 1250, "c1", "k1")
	require.NoError(t, err)
	require.Equal(t, stripe.PaymentIntentStatusSucceeded, pi.Status)
	require.Equal(t, int64(1250), pi.Amount)
	require.Equal(t, int64(1250), pi.AmountReceived)
	require.Equal(t, "c1", pi.Metadata["charge_id"])
	require.Equal(t, cus, pi.Customer.ID)
	require.NotNil(t, pi.LatestCharge)
	require.True(t, strings.HasPrefix(pi.LatestCharge.ID, "ch_"))
	require.True(t, strings.HasPrefix(pi.PaymentMethod.ID, "pm_"))
	require.NotEqual(t, "pm_card_visa", pi.PaymentMethod.ID, "a token becomes a fresh PaymentMethod")

	got, err := b.sc.V1PaymentIntents.Retrieve(t.Context(), pi.ID, &stripe.PaymentIntentRetrieveParams{
		Expand: []*string{stripe.String("payment_method"), stripe.String("latest_charge")},
	})
	require.NoError(t, err)
	require.Equal(t, "4242", got.PaymentMethod.Card.Last4)
	require.Equal(t, stripe.PaymentMethodCardBrand("visa"), got.PaymentMethod.Card.Brand)
	require.True(t, got.LatestCharge.Paid)

	require.Equal(t, 1, b.fake.SuccessfulCharges("c1"))
	require.Equal(t, stripefake.Totals{Collected: 1250}, b.fake.Totals()["usd"])
}

// TestDeclines charges each declining test card off-session and checks the
// error exactly as stripe-go decodes it.
func TestDeclines(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	cases := []struct {
		pm, code, decline, message string
	}{
		{"pm_card_chargeDeclined", "card_declined", "generic_decline", "Your card was declined."},
		{"pm_card_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds", "Your card has insufficient funds."},
		{"pm_card_chargeDeclinedLostCard", "card_declined", "lost_card", "Your card was declined."},
		{"pm_card_chargeDeclinedStolenCard", "card_declined", "stolen_card", "Your card was declined."},
		{"pm_card_chargeDeclinedExpiredCard", "expired_card", "expired_card", "Your card has expired."},
		{"pm_card_chargeDeclinedProcessingError", "processing_error", "processing_error", "An error occurred while processing your card. Try again in a little bit."},
		{"pm_card_chargeCustomerFail", "card_declined", "generic_decline", "Your card was declined."},
		{"pm_card_authenticationRequired", "authentication_required", "authentication_required", "Your card was declined. This transaction requires authentication."},
	}
	for i, tc := range cases {
		t.Run(tc.pm, func(t *testing.T) {
			t.Parallel()
			chargeID := fmt.Sprintf("d%d", i)
			_, err := b.charge(t, cus, tc.pm, 2000, chargeID, "key-"+chargeID)
			se := stripeErr(t, err)
			require.Equal(t, 402, se.HTTPStatusCode)
			require.Equal(t, stripe.ErrorTypeCard, se.Type)
			require.Equal(t, stripe.ErrorCode(tc.code), se.Code)
			require.Equal(t, stripe.DeclineCode(tc.decline), se.DeclineCode)
			require.Equal(t, tc.message, se.Msg)
			require.True(t, strings.HasPrefix(se.ChargeID, "ch_"))
			require.NotEmpty(t, se.RequestID)
			var cardErr *stripe.CardError
			require.ErrorAs(t, err, &cardErr)
			require.Equal(t, stripe.DeclineCode(tc.decline), cardErr.DeclineCode)

			require.NotNil(t, se.PaymentIntent)
			require.True(t, strings.HasPrefix(se.PaymentIntent.ID, "pi_"))
			require.Equal(t, stripe.PaymentIntentStatusRequiresPaymentMethod, se.PaymentIntent.Status)
			require.Equal(t, chargeID, se.PaymentIntent.Metadata["charge_id"])
			require.NotNil(t, se.PaymentIntent.LastPaymentError)
			require.Equal(t, stripe.DeclineCode(tc.decline), se.PaymentIntent.LastPaymentError.DeclineCode)
			require.NotNil(t, se.PaymentIntent.LastPaymentError.PaymentMethod)
			require.Nil(t, se.PaymentIntent.PaymentMethod, "Stripe clears payment_method after a failure")

			stored, ok := b.fake.PaymentIntent(se.PaymentIntent.ID)
			require.True(t, ok)
			require.Equal(t, "requires_payment_method", stored.Status)
			require.Equal(t, tc.decline, stored.LastDeclineCode)
			require.Equal(t, 0, b.fake.SuccessfulCharges(chargeID))
		})
	}
}

func TestSavedCards(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := t.Context()

	t.Run("declining cards fail the card check on attach", func(t *testing.T) {
		t.Parallel()
		cus := b.customer(t)
		_, err := b.sc.V1PaymentMethods.Attach(ctx, "pm_card_chargeDeclinedInsufficientFunds", stripeapi.PaymentMethodAttach(cus))
		se := stripeErr(t, err)
		require.Equal(t, 402, se.HTTPStatusCode)
		require.Equal(t, stripe.DeclineCode("insufficient_funds"), se.DeclineCode)
		require.Empty(t, b.fake.CustomerPaymentMethods(cus))
	})

	t.Run("chargeCustomerFail attaches, then every charge fails", func(t *testing.T) {
		t.Parallel()
		cus := b.customer(t)
		pm, err := b.sc.V1PaymentMethods.Attach(ctx, "pm_card_chargeCustomerFail", stripeapi.PaymentMethodAttach(cus))
		require.NoError(t, err)
		require.Equal(t, cus, pm.Customer.ID)
		require.Equal(t, "0341", pm.Card.Last4)
		require.NotEmpty(t, pm.Card.Fingerprint)
		for i := range 2 {
			_, err = b.charge(t, cus, pm.ID, 1000, "ccf", fmt.Sprintf("ccf-%d", i))
			require.Equal(t, stripe.DeclineCode("generic_decline"), stripeErr(t, err).DeclineCode)
		}
	})

	t.Run("authenticationRequired attaches, fails off-session, asks for 3DS on-session", func(t *testing.T) {
		t.Parallel()
		cus := b.customer(t)
		pm, err := b.sc.V1PaymentMethods.Attach(ctx, "pm_card_authenticationRequired", stripeapi.PaymentMethodAttach(cus))
		require.NoError(t, err)
		_, err = b.charge(t, cus, pm.ID, 1000, "auth", "auth-1")
		require.Equal(t, stripe.ErrorCodeAuthenticationRequired, stripeErr(t, err).Code)

		onSession, err := b.sc.V1PaymentIntents.Create(ctx, &stripe.PaymentIntentCreateParams{
			Amount: stripe.Int64(1000), Currency: stripe.String("usd"), Customer: stripe.String(cus),
			PaymentMethod: stripe.String(pm.ID), Confirm: stripe.Bool(true),
			PaymentMethodTypes: stripe.StringSlice([]string{"card"}),
		})
		require.NoError(t, err)
		require.Equal(t, stripe.PaymentIntentStatusRequiresAction, onSession.Status)
	})

	t.Run("a saved card is reusable, a used unattached one is not", func(t *testing.T) {
		t.Parallel()
		cus := b.customer(t)
		pm, err := b.sc.V1PaymentMethods.Attach(ctx, "pm_card_visa", stripeapi.PaymentMethodAttach(cus))
		require.NoError(t, err)
		for i := range 3 {
			_, err := b.charge(t, cus, pm.ID, 1000, "reuse", fmt.Sprintf("reuse-%d", i))
			require.NoError(t, err)
		}
		require.Equal(t, 3, b.fake.SuccessfulCharges("reuse"))

		once, err := b.charge(t, cus, "pm_card_visa", 1000, "once", "once-1")
		require.NoError(t, err)
		_, err = b.charge(t, cus, once.PaymentMethod.ID, 1000, "once", "once-2")
		se := stripeErr(t, err)
		require.Equal(t, 400, se.HTTPStatusCode)
		require.Contains(t, se.Msg, "may not be used again")
	})

	t.Run("another customer's card is refused", func(t *testing.T) {
		t.Parallel()
		owner, other := b.customer(t), b.customer(t)
		pm, err := b.sc.V1PaymentMethods.Attach(ctx, "pm_card_visa", stripeapi.PaymentMethodAttach(owner))
		require.NoError(t, err)
		_, err = b.charge(t, other, pm.ID, 1000, "x", "other-1")
		require.Equal(t, stripe.ErrorTypeInvalidRequest, stripeErr(t, err).Type)
	})

	t.Run("detach", func(t *testing.T) {
		t.Parallel()
		cus := b.customer(t)
		pm, err := b.sc.V1PaymentMethods.Attach(ctx, "pm_card_visa", stripeapi.PaymentMethodAttach(cus))
		require.NoError(t, err)
		det, err := b.sc.V1PaymentMethods.Detach(ctx, pm.ID, nil)
		require.NoError(t, err)
		require.Nil(t, det.Customer)
		_, err = b.charge(t, cus, pm.ID, 1000, "det", "det-1")
		require.Equal(t, 400, stripeErr(t, err).HTTPStatusCode)
		got, err := b.sc.V1PaymentMethods.Retrieve(ctx, pm.ID, nil)
		require.NoError(t, err)
		require.Nil(t, got.Customer)
	})

	t.Run("AttachTestCard saves a card that declines later", func(t *testing.T) {
		t.Parallel()
		cus := b.customer(t)
		pmID, err := b.fake.AttachTestCard(cus, "pm_card_chargeDeclinedLostCard")
		require.NoError(t, err)
		_, err = b.charge(t, cus, pmID, 1000, "lost", "lost-1")
		require.Equal(t, stripe.DeclineCode("lost_card"), stripeErr(t, err).DeclineCode)
	})
}

func TestSearch(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := t.Context()
	cus := b.customer(t)

	_, err := b.charge(t, cus, "pm_card_chargeDeclined", 1000, "s1", "s1-a")
	require.Error(t, err)
	ok, err := b.charge(t, cus, "pm_card_visa", 1000, "s1", "s1-b")
	require.NoError(t, err)
	_, err = b.charge(t, cus, "pm_card_visa", 1000, "s2", "s2-a")
	require.NoError(t, err)

	search := func(q string, limit int64) []*stripe.PaymentIntent {
		t.Helper()
		p := &stripe.PaymentIntentSearchParams{}
		p.Query = q
		if limit > 0 {
			p.Limit = stripe.Int64(limit)
		}
		var out []*stripe.PaymentIntent
		for pi, err := range b.sc.V1PaymentIntents.Search(ctx, p) {
			require.NoError(t, err)
			out = append(out, pi)
		}
		return out
	}

	all := search(stripeapi.PaymentIntentSearchByCharge("", "s1").Query, 0)
	require.Len(t, all, 2)
	require.Equal(t, ok.ID, all[0].ID, "newest first")
	require.Equal(t, stripe.PaymentIntentStatusRequiresPaymentMethod, all[1].Status)

	succeeded := search(`metadata['charge_id']:'s1' AND status:'succeeded'`, 0)
	require.Len(t, succeeded, 1)
	require.Equal(t, ok.ID, succeeded[0].ID)

	require.Len(t, search(`metadata["charge_id"]:"s2" AND -status:"succeeded"`, 0), 0)
	require.Len(t, search(`customer:'`+cus+`' AND amount>=1000`, 1), 3, "pages of one are followed")
	require.Empty(t, search(`metadata['charge_id']:'nope'`, 0))

	for _, bad := range []string{`metadata['charge_id']:'s1' OR status:'succeeded'`, `status:succeeded`, `shoe_size:'9'`, ``} {
		p := &stripe.PaymentIntentSearchParams{}
		p.Query = bad
		for _, err := range b.sc.V1PaymentIntents.Search(ctx, p) {
			se := stripeErr(t, err)
			require.Equal(t, 400, se.HTTPStatusCode, bad)
			break
		}
	}
}

func TestRefunds(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := t.Context()
	cus := b.customer(t)
	pi, err := b.charge(t, cus, "pm_card_visa", 1000, "r1", "r1")
	require.NoError(t, err)

	re, err := b.sc.V1Refunds.Create(ctx, stripeapi.Refund(pi.ID, 300, map[string]string{"why": "goodwill"}, "re-1"))
	require.NoError(t, err)
	require.Equal(t, int64(300), re.Amount)
	require.Equal(t, stripe.RefundStatusSucceeded, re.Status)
	require.Equal(t, "goodwill", re.Metadata["why"])
	require.Equal(t, pi.ID, re.PaymentIntent.ID)

	_, err = b.sc.V1Refunds.Create(ctx, stripeapi.Refund(pi.ID, 800, nil, "re-2"))
	require.Equal(t, stripe.ErrorCodeAmountTooLarge, stripeErr(t, err).Code)

	rest, err := b.sc.V1Refunds.Create(ctx, stripeapi.Refund(pi.ID, 0, nil, "re-3"))
	require.NoError(t, err)
	require.Equal(t, int64(700), rest.Amount)

	_, err = b.sc.V1Refunds.Create(ctx, stripeapi.Refund(pi.ID, 0, nil, "re-4"))
	require.Equal(t, stripe.ErrorCodeChargeAlreadyRefunded, stripeErr(t, err).Code)

	_, err = b.charge(t, cus, "pm_card_chargeDeclined", 1000, "r2", "r2")
	failed := stripeErr(t, err).PaymentIntent
	_, err = b.sc.V1Refunds.Create(ctx, stripeapi.Refund(failed.ID, 0, nil, "re-5"))
	require.Equal(t, 400, stripeErr(t, err).HTTPStatusCode)

	eur, err := b.sc.V1PaymentIntents.Create(ctx, stripeapi.OffSessionPaymentIntent(cus, "pm_card_visa", 5000, "eur", "", nil, "eur-1"))
	require.NoError(t, err)
	_, err = b.sc.V1Refunds.Create(ctx, stripeapi.Refund(eur.ID, 1000, nil, "re-6"))
	require.NoError(t, err)

	totals := b.fake.Totals()
	require.Equal(t, stripefake.Totals{Collected: 1000, Refunded: 1000}, totals["usd"])
	require.Equal(t, int64(0), totals["usd"].Net())
	require.Equal(t, stripefake.Totals{Collected: 5000, Refunded: 1000}, totals["eur"])
	require.Equal(t, 1, b.fake.SuccessfulCharges("r1"), "refunds do not change the count")
	stored, _ := b.fake.PaymentIntent(pi.ID)
	require.Equal(t, int64(1000), stored.AmountRefunded)
}

// TestConcurrentCharges hammers the emulator from many goroutines, half of
// them repeating another's idempotency key: each key charges exactly once.
func TestConcurrentCharges(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	const workers, perWorker = 8, 25
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range perWorker {
				id := fmt.Sprintf("cc-%d", (w/2)*perWorker+i) // workers 2k and 2k+1 share keys
				pi, err := b.charge(t, cus, "pm_card_visa", 1000, id, id)
				if err != nil {
					// The twin may still be in flight: 409, then a retry replays.
					require.Equal(t, 409, stripeErr(t, err).HTTPStatusCode)
					eventually(t, func() bool {
						pi, err = b.charge(t, cus, "pm_card_visa", 1000, id, id)
						return err == nil
					}, "replay after 409")
				}
				require.Equal(t, stripe.PaymentIntentStatusSucceeded, pi.Status)
			}
		})
	}
	wg.Wait()
	counts := b.fake.SuccessfulChargesByChargeID()
	require.Len(t, counts, workers/2*perWorker)
	for id, n := range counts {
		require.Equal(t, 1, n, id)
	}
	require.Len(t, b.fake.PaymentIntents(), workers/2*perWorker)
}

func BenchmarkCreatePaymentIntent(b *testing.B) {
	fake := stripefake.New()
	defer fake.Close()
	srv := httptest.NewServer(fake)
	defer srv.Close()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
	sc := stripeapi.NewClient(testKey, srv.URL, client, 0)
	cus, err := sc.V1Customers.Create(b.Context(), nil)
	if err != nil {
		b.Fatal(err)
	}
	var n int64
	var mu sync.Mutex
	b.SetParallelism(16) // many clients in flight, like a pool of charge workers
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			mu.Lock()
			n++
			id := fmt.Sprint(n)
			mu.Unlock()
			if _, err := sc.V1PaymentIntents.Create(b.Context(), stripeapi.OffSessionPaymentIntent(cus.ID, "pm_card_visa", 1000, "usd", "", map[string]string{"charge_id": id}, id)); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "PIs/s")
}

// BenchmarkServeCreatePaymentIntent measures the emulator alone: off-session
// charges handed straight to ServeHTTP, without sockets or a client.
func BenchmarkServeCreatePaymentIntent(b *testing.B) {
	fake := stripefake.New()
	defer fake.Close()
	rec := httptest.NewRecorder()
	fake.ServeHTTP(rec, newFormRequest("/v1/customers", "email=b%40example.com", ""))
	var cus struct{ ID string }
	if err := json.Unmarshal(rec.Body.Bytes(), &cus); err != nil {
		b.Fatal(err)
	}
	var n atomic.Int64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			id := strconv.FormatInt(n.Add(1), 10)
			body := "amount=1000&currency=usd&confirm=true&off_session=true&payment_method=pm_card_visa" +
				"&payment_method_types[0]=card&customer=" + cus.ID + "&metadata[charge_id]=" + id
			rec := httptest.NewRecorder()
			fake.ServeHTTP(rec, newFormRequest("/v1/payment_intents", body, "k"+id))
			if rec.Code != http.StatusOK {
				b.Errorf("status %d: %s", rec.Code, rec.Body)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "PIs/s")
}

func newFormRequest(path, body, idemKey string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, path, strings.NewReader(body))
	r.Header.Set("Authorization", "Bearer "+testKey)
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if idemKey != "" {
		r.Header.Set("Idempotency-Key", idemKey)
	}
	return r
}

func TestSearchLag(t *testing.T) {
	t.Parallel()
	clock := newClock()
	b := setup(t, stripefake.WithClock(clock.Now), stripefake.WithSearchLag(time.Minute))
	cus := b.customer(t)
	_, err := b.charge(t, cus, "pm_card_visa", 1000, "lag", "lag")
	require.NoError(t, err)
	count := func() int {
		n := 0
		for _, err := range b.sc.V1PaymentIntents.Search(t.Context(), stripeapi.PaymentIntentSearchByCharge("", "lag")) {
			require.NoError(t, err)
			n++
		}
		return n
	}
	require.Zero(t, count(), "not yet indexed")
	require.Len(t, b.fake.PaymentIntentsByMetadata("charge_id", "lag"), 1, "inspection sees it at once")
	clock.Advance(61 * time.Second)
	require.Equal(t, 1, count())
}
