package stripefake_test

import (
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/stripefake"
)

func TestSetupSessionFlow(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := t.Context()
	cus := b.customer(t)
	before := time.Now()

	cs, err := b.sc.V1CheckoutSessions.Create(ctx, stripeapi.SetupSession(cus, "usd",
		"https://app.example/ok", "https://app.example/no", map[string]string{"setup_id": "77"}, "I accept the terms."))
	require.NoError(t, err)
	require.Equal(t, stripe.CheckoutSessionModeSetup, cs.Mode)
	require.Equal(t, stripe.CheckoutSessionStatusOpen, cs.Status)
	require.True(t, strings.HasPrefix(cs.ID, "cs_test_"))
	require.Equal(t, b.srv.URL+"/c/pay/"+cs.ID, cs.URL, "the hosted page is the fake's")
	require.InDelta(t, before.Add(24*time.Hour).Unix(), cs.ExpiresAt, 5)
	require.Equal(t, "I accept the terms.", cs.CustomText.TermsOfServiceAcceptance.Message)
	require.Nil(t, cs.SetupIntent)

	require.NoError(t, b.fake.CompleteCheckoutSession(ctx, cs.ID, "pm_card_visa"))
	require.ErrorIs(t, b.fake.CompleteCheckoutSession(ctx, cs.ID, "pm_card_visa"), stripefake.ErrSessionNotOpen)

	done, err := b.sc.V1CheckoutSessions.Retrieve(ctx, cs.ID, &stripe.CheckoutSessionRetrieveParams{
		Expand: []*string{stripe.String("setup_intent.payment_method")},
	})
	require.NoError(t, err)
	require.Equal(t, stripe.CheckoutSessionStatusComplete, done.Status)
	require.Equal(t, stripe.CheckoutSessionPaymentStatusNoPaymentRequired, done.PaymentStatus)
	require.Empty(t, done.URL, "no url once complete")
	require.Equal(t, stripe.CheckoutSessionConsentTermsOfServiceAccepted, done.Consent.TermsOfService)
	require.Equal(t, "ada@example.com", done.CustomerDetails.Email)
	require.Equal(t, "4242", done.SetupIntent.PaymentMethod.Card.Last4, "nested expansion")

	si, err := b.sc.V1SetupIntents.Retrieve(ctx, done.SetupIntent.ID, stripeapi.SetupIntentRetrieve())
	require.NoError(t, err)
	require.Equal(t, stripe.SetupIntentStatusSucceeded, si.Status)
	require.Equal(t, stripe.SetupIntentUsageOffSession, si.Usage)
	require.Equal(t, "77", si.Metadata["setup_id"])
	require.Equal(t, cus, si.Customer.ID)
	card := si.PaymentMethod.Card
	require.Equal(t, stripe.PaymentMethodCardBrand("visa"), card.Brand)
	require.Equal(t, "4242", card.Last4)
	require.Equal(t, int64(12), card.ExpMonth)
	require.Greater(t, card.ExpYear, int64(time.Now().Year()))
	require.NotEmpty(t, card.Fingerprint)
	require.Equal(t, cus, si.PaymentMethod.Customer.ID, "attached to the session's customer")

	saved := b.fake.CustomerPaymentMethods(cus)
	require.Len(t, saved, 1)
	require.Equal(t, si.PaymentMethod.ID, saved[0].ID)

	// The saved card charges off-session.
	pi, err := b.charge(t, cus, si.PaymentMethod.ID, 1000, "after-setup", "after-setup")
	require.NoError(t, err)
	require.Equal(t, stripe.PaymentIntentStatusSucceeded, pi.Status)

	got, ok := b.fake.CheckoutSession(cs.ID)
	require.True(t, ok)
	require.Equal(t, "complete", got.Status)
	require.Len(t, b.fake.CheckoutSessionsByMetadata("setup_id", "77"), 1)
}

func TestSetupSessionDeclinedCard(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	cs, err := b.sc.V1CheckoutSessions.Create(t.Context(), stripeapi.SetupSession(cus, "usd", "https://a.example/ok", "https://a.example/no", nil, ""))
	require.NoError(t, err)

	err = b.fake.CompleteCheckoutSession(t.Context(), cs.ID, "pm_card_chargeDeclinedStolenCard")
	var ce *stripefake.CardError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, "stolen_card", ce.DeclineCode)
	got, _ := b.fake.CheckoutSession(cs.ID)
	require.Equal(t, "open", got.Status)
	require.Empty(t, b.fake.CustomerPaymentMethods(cus))

	require.NoError(t, b.fake.CompleteCheckoutSession(t.Context(), cs.ID, "pm_card_visa"))
	got, _ = b.fake.CheckoutSession(cs.ID)
	require.Equal(t, "complete", got.Status)
}

func TestRecoverySessionFlow(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, whsec)
	b := setup(t, stripefake.WithWebhook(rc.srv.URL, whsec))
	ctx := t.Context()
	cus := b.customer(t)

	cs, err := b.sc.V1CheckoutSessions.Create(ctx, stripeapi.RecoverySession(cus, 4500, "usd", "Installment 2 of 3",
		"https://app.example/paid?cs={CHECKOUT_SESSION_ID}", "https://app.example/no", map[string]string{"charge_id": "r9"}, "recovery-r9"))
	require.NoError(t, err)
	require.Equal(t, int64(4500), cs.AmountTotal)
	require.Equal(t, stripe.CheckoutSessionPaymentStatusUnpaid, cs.PaymentStatus)
	require.Nil(t, cs.PaymentIntent, "the PaymentIntent comes with the first attempt")

	err = b.fake.CompleteCheckoutSession(ctx, cs.ID, "pm_card_chargeDeclinedInsufficientFunds")
	var ce *stripefake.CardError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, "insufficient_funds", ce.DeclineCode)
	open, _ := b.fake.CheckoutSession(cs.ID)
	require.Equal(t, "open", open.Status, "a decline leaves the session open")
	require.NotEmpty(t, open.PaymentIntent)
	failed, _ := b.fake.PaymentIntent(open.PaymentIntent)
	require.Equal(t, "requires_payment_method", failed.Status)

	require.NoError(t, b.fake.CompleteCheckoutSession(ctx, cs.ID, "pm_card_visa"))
	paid, _ := b.fake.CheckoutSession(cs.ID)
	require.Equal(t, "complete", paid.Status)
	require.Equal(t, "paid", paid.PaymentStatus)
	require.Equal(t, open.PaymentIntent, paid.PaymentIntent, "the retry reuses the PaymentIntent")

	pi, err := b.sc.V1PaymentIntents.Retrieve(ctx, paid.PaymentIntent, nil)
	require.NoError(t, err)
	require.Equal(t, stripe.PaymentIntentStatusSucceeded, pi.Status)
	require.Equal(t, int64(4500), pi.Amount)
	require.Equal(t, "r9", pi.Metadata["charge_id"], "payment_intent_data metadata")
	require.Equal(t, stripe.PaymentIntentSetupFutureUsageOffSession, pi.SetupFutureUsage)
	require.Equal(t, 1, b.fake.SuccessfulCharges("r9"))
	saved := b.fake.CustomerPaymentMethods(cus)
	require.Len(t, saved, 1, "setup_future_usage saves the new card")
	require.Equal(t, pi.PaymentMethod.ID, saved[0].ID)

	waitDeliveries(t, b.fake)
	require.Subset(t, rc.types(), []string{"charge.failed", "payment_intent.payment_failed", "charge.succeeded",
		"payment_intent.succeeded", "payment_method.attached", "checkout.session.completed"})
	for _, ev := range rc.received() {
		if ev.Type == stripe.EventTypeCheckoutSessionCompleted {
			require.Equal(t, "r9", ev.GetObjectValue("metadata", "charge_id"))
			require.Equal(t, paid.PaymentIntent, ev.GetObjectValue("payment_intent"))
		}
	}
}

func TestHostedCheckoutPage(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	cs, err := b.sc.V1CheckoutSessions.Create(t.Context(), stripeapi.RecoverySession(cus, 1000, "eur", "Top-up",
		"https://app.example/paid?cs={CHECKOUT_SESSION_ID}", "https://app.example/no", map[string]string{"charge_id": "h1"}, "h1"))
	require.NoError(t, err)
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

	resp, err := client.Get(cs.URL)
	require.NoError(t, err)
	page, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, string(page), `value="pm_card_visa"`)
	require.Contains(t, string(page), `value="pm_card_chargeDeclined"`)
	require.Contains(t, string(page), "10.00 eur")

	post := func(pm string) (*http.Response, string) {
		resp, err := client.PostForm(cs.URL, url.Values{"payment_method": {pm}})
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		return resp, string(body)
	}
	resp, body := post("pm_card_chargeDeclined")
	require.Equal(t, http.StatusPaymentRequired, resp.StatusCode)
	require.Contains(t, body, "Your card was declined.")

	resp, _ = post("pm_card_visa")
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.Equal(t, "https://app.example/paid?cs="+cs.ID, resp.Header.Get("Location"))
	require.Equal(t, 1, b.fake.SuccessfulCharges("h1"))

	resp, _ = post("pm_card_visa")
	require.Equal(t, http.StatusConflict, resp.StatusCode, "a complete session takes no second payment")
	require.Equal(t, 1, b.fake.SuccessfulCharges("h1"))
}

func TestHostedPageTerms(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	cs, err := b.sc.V1CheckoutSessions.Create(t.Context(), stripeapi.SetupSession(cus, "usd",
		"https://app.example/ok", "https://app.example/no", nil, "Charge me monthly."))
	require.NoError(t, err)

	resp, err := http.Get(cs.URL)
	require.NoError(t, err)
	page, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	require.Contains(t, string(page), "Charge me monthly.")

	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err = noRedirect.PostForm(cs.URL, url.Values{"payment_method": {"pm_card_visa"}})
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, "terms not accepted")
	resp, err = noRedirect.PostForm(cs.URL, url.Values{"payment_method": {"pm_card_visa"}, "accept_terms": {"on"}})
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
}

func TestHelperCompleteRoute(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	cs, err := b.sc.V1CheckoutSessions.Create(t.Context(), stripeapi.SetupSession(cus, "usd", "https://a.example/ok", "https://a.example/no", nil, ""))
	require.NoError(t, err)
	resp, err := http.PostForm(b.srv.URL+"/_stripefake/checkout/"+cs.ID+"/complete", url.Values{"payment_method": {"pm_card_chargeDeclined"}})
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusPaymentRequired, resp.StatusCode)
	resp, err = http.PostForm(b.srv.URL+"/_stripefake/checkout/"+cs.ID+"/complete", nil)
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	got, _ := b.fake.CheckoutSession(cs.ID)
	require.Equal(t, "complete", got.Status)
}

func TestExpireSession(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, whsec)
	b := setup(t, stripefake.WithWebhook(rc.srv.URL, whsec), stripefake.WithWebhookEvents("checkout.session.expired", "payment_intent.canceled"))
	ctx := t.Context()
	cus := b.customer(t)
	cs, err := b.sc.V1CheckoutSessions.Create(ctx, stripeapi.RecoverySession(cus, 1000, "usd", "x",
		"https://a.example/ok", "https://a.example/no", map[string]string{"charge_id": "e1"}, "e1"))
	require.NoError(t, err)
	require.Error(t, b.fake.CompleteCheckoutSession(ctx, cs.ID, "pm_card_chargeDeclined"))

	exp, err := b.sc.V1CheckoutSessions.Expire(ctx, cs.ID, stripeapi.ExpireSession())
	require.NoError(t, err)
	require.Equal(t, stripe.CheckoutSessionStatusExpired, exp.Status)
	require.Empty(t, exp.URL)
	require.ErrorIs(t, b.fake.CompleteCheckoutSession(ctx, cs.ID, "pm_card_visa"), stripefake.ErrSessionNotOpen)
	_, err = b.sc.V1CheckoutSessions.Expire(ctx, cs.ID, stripeapi.ExpireSession())
	require.Equal(t, 400, stripeErr(t, err).HTTPStatusCode)

	waitDeliveries(t, b.fake)
	require.ElementsMatch(t, []string{"payment_intent.canceled", "checkout.session.expired"}, rc.types())
	pis := b.fake.PaymentIntentsByMetadata("charge_id", "e1")
	require.Len(t, pis, 1)
	require.Equal(t, "canceled", pis[0].Status)
}

func TestSessionExpiresWithTheClock(t *testing.T) {
	t.Parallel()
	clock := newClock()
	b := setup(t, stripefake.WithClock(clock.Now))
	cus := b.customer(t)
	p := stripeapi.SetupSession(cus, "usd", "https://a.example/ok", "https://a.example/no", nil, "")
	p.ExpiresAt = stripe.Int64(clock.Now().Add(31 * time.Minute).Unix())
	cs, err := b.sc.V1CheckoutSessions.Create(t.Context(), p)
	require.NoError(t, err)

	clock.Advance(30 * time.Minute)
	b.fake.SweepExpiredSessions()
	got, _ := b.fake.CheckoutSession(cs.ID)
	require.Equal(t, "open", got.Status)

	clock.Advance(2 * time.Minute)
	b.fake.SweepExpiredSessions()
	require.Equal(t, []string{"customer.created", "checkout.session.expired"}, eventTypes(b.fake.Events()))
	read, err := b.sc.V1CheckoutSessions.Retrieve(t.Context(), cs.ID, nil)
	require.NoError(t, err)
	require.Equal(t, stripe.CheckoutSessionStatusExpired, read.Status)
}

func TestCheckoutValidation(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	ok := func() *stripe.CheckoutSessionCreateParams {
		return stripeapi.RecoverySession(cus, 1000, "usd", "x", "https://a.example/ok", "https://a.example/no", nil, "")
	}
	cases := map[string]struct {
		params func() *stripe.CheckoutSessionCreateParams
		param  string
		code   stripe.ErrorCode
	}{
		"setup needs a currency": {func() *stripe.CheckoutSessionCreateParams {
			p := stripeapi.SetupSession(cus, "usd", "https://a.example/ok", "https://a.example/no", nil, "")
			p.Currency, p.PaymentMethodTypes = nil, nil
			return p
		}, "currency", stripe.ErrorCodeParameterMissing},
		"payment needs line items": {func() *stripe.CheckoutSessionCreateParams {
			p := ok()
			p.LineItems = nil
			return p
		}, "line_items", stripe.ErrorCodeParameterMissing},
		"below the minimum": {func() *stripe.CheckoutSessionCreateParams {
			p := ok()
			p.LineItems[0].PriceData.UnitAmount = stripe.Int64(49)
			return p
		}, "line_items", stripe.ErrorCodeAmountTooSmall},
		"embedded pages are not served": {func() *stripe.CheckoutSessionCreateParams {
			p := ok()
			p.UIMode = stripe.String("embedded")
			return p
		}, "ui_mode", ""},
		"expiry beyond 24h": {func() *stripe.CheckoutSessionCreateParams {
			p := ok()
			p.ExpiresAt = stripe.Int64(time.Now().Add(25 * time.Hour).Unix())
			return p
		}, "expires_at", ""},
		"unknown customer": {func() *stripe.CheckoutSessionCreateParams {
			p := ok()
			p.Customer = stripe.String("cus_nope")
			return p
		}, "customer", stripe.ErrorCodeResourceMissing},
		"terms text without consent collection": {func() *stripe.CheckoutSessionCreateParams {
			p := ok()
			p.CustomText = &stripe.CheckoutSessionCreateCustomTextParams{
				TermsOfServiceAcceptance: &stripe.CheckoutSessionCreateCustomTextTermsOfServiceAcceptanceParams{Message: stripe.String("t")},
			}
			return p
		}, "custom_text[terms_of_service_acceptance]", ""},
		"unknown nested parameter": {func() *stripe.CheckoutSessionCreateParams {
			p := ok()
			p.AddExtra("line_items[0][price_data][tax_behavior]", "inclusive")
			return p
		}, "line_items[0][price_data][tax_behavior]", stripe.ErrorCodeParameterUnknown},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			_, err := b.sc.V1CheckoutSessions.Create(t.Context(), tc.params())
			se := stripeErr(t, err)
			require.Equal(t, 400, se.HTTPStatusCode, se.Msg)
			require.Equal(t, stripe.ErrorTypeInvalidRequest, se.Type)
			require.Equal(t, tc.param, se.Param, se.Msg)
			require.Equal(t, tc.code, se.Code, se.Msg)
		})
	}
	_, err := b.sc.V1CheckoutSessions.Create(t.Context(), ok())
	require.NoError(t, err, "the unmodified shape is fine")
}

func TestConcurrentCompletion(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	cs, err := b.sc.V1CheckoutSessions.Create(t.Context(), stripeapi.RecoverySession(cus, 1000, "usd", "x",
		"https://a.example/ok", "https://a.example/no", map[string]string{"charge_id": "cc1"}, "cc1"))
	require.NoError(t, err)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() { errs <- b.fake.CompleteCheckoutSession(t.Context(), cs.ID, "pm_card_visa") })
	}
	wg.Wait()
	close(errs)
	okCount := 0
	for err := range errs {
		if err == nil {
			okCount++
			continue
		}
		require.True(t, errors.Is(err, stripefake.ErrSessionNotOpen), err)
	}
	require.Equal(t, 1, okCount)
	require.Equal(t, 1, b.fake.SuccessfulCharges("cc1"))
}

// TestCheckoutAcceptsEveryFieldBillingdSends sends each Checkout field the
// design lists and reads it back.
func TestCheckoutAcceptsEveryFieldBillingdSends(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	expires := time.Now().Add(2 * time.Hour).Unix()
	p := &stripe.CheckoutSessionCreateParams{
		Mode:               stripe.String("payment"),
		Customer:           stripe.String(cus),
		Currency:           stripe.String("gbp"),
		SuccessURL:         stripe.String("https://a.example/ok"),
		CancelURL:          stripe.String("https://a.example/no"),
		ClientReferenceID:  stripe.String("charge-5"),
		ExpiresAt:          stripe.Int64(expires),
		Metadata:           map[string]string{"charge_id": "5"},
		PaymentMethodTypes: stripe.StringSlice([]string{"card"}),
		LineItems: []*stripe.CheckoutSessionCreateLineItemParams{{
			PriceData: &stripe.CheckoutSessionCreateLineItemPriceDataParams{
				Currency: stripe.String("gbp"), UnitAmount: stripe.Int64(700),
				ProductData: &stripe.CheckoutSessionCreateLineItemPriceDataProductDataParams{Name: stripe.String("Top-up")},
			},
			Quantity: stripe.Int64(2),
		}},
		PaymentIntentData: &stripe.CheckoutSessionCreatePaymentIntentDataParams{
			Metadata: map[string]string{"charge_id": "5"}, SetupFutureUsage: stripe.String("off_session"),
		},
		ConsentCollection: &stripe.CheckoutSessionCreateConsentCollectionParams{TermsOfService: stripe.String("required")},
		CustomText: &stripe.CheckoutSessionCreateCustomTextParams{
			TermsOfServiceAcceptance: &stripe.CheckoutSessionCreateCustomTextTermsOfServiceAcceptanceParams{Message: stripe.String("Terms v3")},
			Submit:                   &stripe.CheckoutSessionCreateCustomTextSubmitParams{Message: stripe.String("You will be charged £14.00")},
		},
	}
	cs, err := b.sc.V1CheckoutSessions.Create(t.Context(), p)
	require.NoError(t, err)
	require.Equal(t, "charge-5", cs.ClientReferenceID)
	require.Equal(t, expires, cs.ExpiresAt)
	require.Equal(t, int64(1400), cs.AmountTotal)
	require.Equal(t, stripe.Currency("gbp"), cs.Currency)
	require.Equal(t, "You will be charged £14.00", cs.CustomText.Submit.Message)
	require.Equal(t, "Terms v3", cs.CustomText.TermsOfServiceAcceptance.Message)
	require.Equal(t, stripe.CheckoutSessionConsentCollectionTermsOfServiceRequired, cs.ConsentCollection.TermsOfService)
	require.Equal(t, []string{"card"}, cs.PaymentMethodTypes)

	setup := stripeapi.SetupSession(cus, "usd", "https://a.example/ok", "https://a.example/no", map[string]string{"k": "v"}, "")
	setup.SetupIntentData.Description = stripe.String("monthly plan")
	cs, err = b.sc.V1CheckoutSessions.Create(t.Context(), setup)
	require.NoError(t, err)
	require.NoError(t, b.fake.CompleteCheckoutSession(t.Context(), cs.ID, "pm_card_visa"))
	got, err := b.sc.V1CheckoutSessions.Retrieve(t.Context(), cs.ID, &stripe.CheckoutSessionRetrieveParams{Expand: []*string{stripe.String("setup_intent")}})
	require.NoError(t, err)
	require.Equal(t, "monthly plan", got.SetupIntent.Description)
	require.Equal(t, "v", got.SetupIntent.Metadata["k"])
}
