package stripefake_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/stripefake"
)

func TestPaymentIntentValidation(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cus := b.customer(t)
	base := func(amount int64, currency string) *stripe.PaymentIntentCreateParams {
		return stripeapi.OffSessionPaymentIntent(cus, "pm_card_visa", amount, currency, "", nil, "")
	}
	cases := map[string]struct {
		params func() *stripe.PaymentIntentCreateParams
		param  string
		code   stripe.ErrorCode
	}{
		"unknown parameter": {func() *stripe.PaymentIntentCreateParams {
			p := base(1000, "usd")
			p.AddExtra("shoe_size", "9")
			return p
		}, "shoe_size", stripe.ErrorCodeParameterUnknown},
		"missing currency": {func() *stripe.PaymentIntentCreateParams {
			p := base(1000, "usd")
			p.Currency = nil
			return p
		}, "currency", stripe.ErrorCodeParameterMissing},
		"missing amount": {func() *stripe.PaymentIntentCreateParams {
			p := base(1000, "usd")
			p.Amount = nil
			return p
		}, "amount", stripe.ErrorCodeParameterMissing},
		"invalid currency": {func() *stripe.PaymentIntentCreateParams { return base(1000, "xyz") }, "currency", ""},
		"zero amount":      {func() *stripe.PaymentIntentCreateParams { return base(0, "usd") }, "amount", stripe.ErrorCodeParameterInvalidInteger},
		"negative amount":  {func() *stripe.PaymentIntentCreateParams { return base(-5, "usd") }, "amount", stripe.ErrorCodeParameterInvalidInteger},
		"below minimum":    {func() *stripe.PaymentIntentCreateParams { return base(49, "usd") }, "amount", stripe.ErrorCodeAmountTooSmall},
		"above maximum":    {func() *stripe.PaymentIntentCreateParams { return base(100_000_000, "usd") }, "amount", stripe.ErrorCodeAmountTooLarge},
		"three-decimal currency not a multiple of 10": {func() *stripe.PaymentIntentCreateParams { return base(1005, "kwd") }, "amount", "invalid_amount"},
		"non-integer amount": {func() *stripe.PaymentIntentCreateParams {
			p := base(1000, "usd")
			p.Amount = nil
			p.AddExtra("amount", "12.50")
			return p
		}, "amount", stripe.ErrorCodeParameterInvalidInteger},
		"confirm without card-only types needs return_url": {func() *stripe.PaymentIntentCreateParams {
			p := base(1000, "usd")
			p.PaymentMethodTypes = nil
			return p
		}, "return_url", ""},
		"off_session without confirm": {func() *stripe.PaymentIntentCreateParams {
			p := base(1000, "usd")
			p.Confirm = nil
			return p
		}, "off_session", ""},
		"unknown customer": {func() *stripe.PaymentIntentCreateParams {
			p := base(1000, "usd")
			p.Customer = stripe.String("cus_nope")
			return p
		}, "customer", stripe.ErrorCodeResourceMissing},
		"unknown payment method": {func() *stripe.PaymentIntentCreateParams {
			p := base(1000, "usd")
			p.PaymentMethod = stripe.String("pm_nope")
			return p
		}, "payment_method", stripe.ErrorCodeResourceMissing},
		"metadata key too long": {func() *stripe.PaymentIntentCreateParams {
			p := base(1000, "usd")
			p.Metadata = map[string]string{strings.Repeat("k", 41): "v"}
			return p
		}, "metadata[" + strings.Repeat("k", 41) + "]", ""},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			_, err := b.sc.V1PaymentIntents.Create(t.Context(), tc.params())
			se := stripeErr(t, err)
			require.Equal(t, 400, se.HTTPStatusCode, se.Msg)
			require.Equal(t, stripe.ErrorTypeInvalidRequest, se.Type)
			require.Equal(t, tc.param, se.Param, se.Msg)
			require.Equal(t, tc.code, se.Code, se.Msg)
		})
	}
	require.Empty(t, b.fake.PaymentIntents(), "no rejected request created anything")

	for _, ok := range []*stripe.PaymentIntentCreateParams{base(50, "jpy"), base(30, "gbp"), base(1010, "kwd"), base(1000, "USD")} {
		pi, err := b.sc.V1PaymentIntents.Create(t.Context(), ok)
		require.NoError(t, err)
		require.Equal(t, strings.ToLower(*ok.Currency), string(pi.Currency))
	}
}

func TestAuthentication(t *testing.T) {
	t.Parallel()
	b := setup(t)
	for _, key := range []string{"", "sk_live_123456789012", "pk_test_123456789012", "sk_test_"} {
		req, err := http.NewRequest(http.MethodGet, b.srv.URL+"/v1/customers/cus_1", nil)
		require.NoError(t, err)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		var body struct {
			Error struct {
				Type    string `json:"type"`
				Message string `json:"message"`
			} `json:"error"`
		}
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&body))
		_ = resp.Body.Close()
		require.Equal(t, http.StatusUnauthorized, resp.StatusCode, key)
		require.Equal(t, "invalid_request_error", body.Error.Type)
		if len(key) > 12 {
			require.NotContains(t, body.Error.Message, key, "the key is redacted")
		}
	}

	// Basic auth (curl -u sk_test_...:) works as on Stripe.
	req, err := http.NewRequest(http.MethodPost, b.srv.URL+"/v1/customers", strings.NewReader("email=a%40b.example"))
	require.NoError(t, err)
	req.SetBasicAuth("sk_test_basic", "")
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	only := setup(t, stripefake.WithAPIKeys("sk_test_only"))
	_, err = only.sc.V1Customers.Create(t.Context(), nil)
	require.Equal(t, 401, stripeErr(t, err).HTTPStatusCode)
	_, err = stripeapi.NewClient("sk_test_only", only.srv.URL, nil, 0).V1Customers.Create(t.Context(), nil)
	require.NoError(t, err)
}

func TestCustomers(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := t.Context()
	c, err := b.sc.V1Customers.Create(ctx, stripeapi.CustomerCreate("5f0c8c1e-3b7a-4d2e-9a41-0c6f2b8e7d19", "ref-42", "grace@example.com"))
	require.NoError(t, err)
	require.Equal(t, "grace@example.com", c.Email)
	require.Equal(t, "ref-42", c.Metadata["customer_ref"])
	again, err := b.sc.V1Customers.Create(ctx, stripeapi.CustomerCreate("5f0c8c1e-3b7a-4d2e-9a41-0c6f2b8e7d19", "ref-42", "grace@example.com"))
	require.NoError(t, err)
	require.Equal(t, c.ID, again.ID, "the ref-derived key makes onboarding retries safe")

	got, err := b.sc.V1Customers.Retrieve(ctx, c.ID, nil)
	require.NoError(t, err)
	require.Equal(t, c.ID, got.ID)

	pm, err := b.sc.V1PaymentMethods.Attach(ctx, "pm_card_mastercard", stripeapi.PaymentMethodAttach(c.ID))
	require.NoError(t, err)
	up, err := b.sc.V1Customers.Update(ctx, c.ID, &stripe.CustomerUpdateParams{
		InvoiceSettings: &stripe.CustomerUpdateInvoiceSettingsParams{DefaultPaymentMethod: stripe.String(pm.ID)},
		Metadata:        map[string]string{"tier": "gold"},
	})
	require.NoError(t, err)
	require.Equal(t, pm.ID, up.InvoiceSettings.DefaultPaymentMethod.ID)
	require.Equal(t, map[string]string{"customer_ref": "ref-42", "tier": "gold", "billingd_installation": "5f0c8c1e-3b7a-4d2e-9a41-0c6f2b8e7d19"}, up.Metadata)

	_, err = b.sc.V1Customers.Retrieve(ctx, "cus_missing", nil)
	se := stripeErr(t, err)
	require.Equal(t, 404, se.HTTPStatusCode)
	require.Equal(t, stripe.ErrorCodeResourceMissing, se.Code)

	_, err = b.sc.V1Customers.Create(ctx, &stripe.CustomerCreateParams{Email: stripe.String("not-an-email")})
	require.Equal(t, "email", stripeErr(t, err).Param)
}

func TestUnknownRouteAndExpand(t *testing.T) {
	t.Parallel()
	b := setup(t)
	req, _ := http.NewRequest(http.MethodGet, b.srv.URL+"/v1/charges", nil)
	req.Header.Set("Authorization", "Bearer "+testKey)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
	require.Contains(t, string(body), "Unrecognized request URL")

	cus := b.customer(t)
	_, err = b.sc.V1Customers.Retrieve(t.Context(), cus, &stripe.CustomerRetrieveParams{Expand: []*string{stripe.String("sources")}})
	require.Equal(t, "expand", stripeErr(t, err).Param)

	// expand[]= (curl's spelling) works as well as expand[0]=.
	req, _ = http.NewRequest(http.MethodGet, b.srv.URL+"/v1/customers/"+cus+"?expand[]=invoice_settings.default_payment_method", nil)
	req.Header.Set("Authorization", "Bearer "+testKey)
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

func TestHelperRoutes(t *testing.T) {
	t.Parallel()
	b := setup(t)
	post := func(path string, form url.Values) int {
		resp, err := http.PostForm(b.srv.URL+path, form)
		require.NoError(t, err)
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	require.Equal(t, http.StatusNoContent, post("/_stripefake/faults", url.Values{
		"kind": {stripefake.KindCreateCustomer}, "fault": {"500_before"}, "count": {"1"}}))
	require.Equal(t, http.StatusBadRequest, post("/_stripefake/faults", url.Values{"kind": {"GET /nope"}, "count": {"1"}}))
	_, err := b.sc.V1Customers.Create(t.Context(), nil)
	require.Equal(t, 500, stripeErr(t, err).HTTPStatusCode)

	cus := b.customer(t)
	_, err = b.charge(t, cus, "pm_card_visa", 1000, "h7", "h7")
	require.NoError(t, err)

	resp, err := http.Get(b.srv.URL + "/_stripefake/summary")
	require.NoError(t, err)
	var sum struct {
		RequestCounts     map[string]int64 `json:"request_counts"`
		SuccessfulCharges map[string]int   `json:"successful_charges"`
		Totals            map[string]struct {
			Net int64 `json:"net"`
		} `json:"totals"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&sum))
	_ = resp.Body.Close()
	require.Equal(t, int64(2), sum.RequestCounts[stripefake.KindCreateCustomer])
	require.Equal(t, 1, sum.SuccessfulCharges["h7"])
	require.Equal(t, int64(1000), sum.Totals["usd"].Net)

	require.Equal(t, http.StatusNoContent, post("/_stripefake/rate_limit", url.Values{"rps": {"1"}, "burst": {"1"}}))
	_, err = b.sc.V1Customers.Create(t.Context(), nil)
	require.NoError(t, err)
	_, err = b.sc.V1Customers.Create(t.Context(), nil)
	require.Equal(t, 429, stripeErr(t, err).HTTPStatusCode)
}
