package stripeapi_test

import (
	"net/url"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82/form"

	"github.com/billingd/billingd/internal/stripeapi"
)

// encode returns the form body stripe-go sends for params.
func encode(t *testing.T, params any) url.Values {
	t.Helper()
	values := &form.Values{}
	form.AppendTo(values, params)
	out, err := url.ParseQuery(values.Encode())
	require.NoError(t, err)
	return out
}

func TestOnboardingBuilders(t *testing.T) {
	t.Parallel()
	md := map[string]string{"setup_session_id": "7"}

	s := stripeapi.OnboardingSession(installation, 7, "cus_1", "USD", "https://s", "https://c", md, "I agree.")
	require.Equal(t, "billingd-"+installation+"-setup-session:7", *s.IdempotencyKey)
	require.Len(t, md, 1, "the caller's metadata is not changed")
	body := encode(t, s)
	require.Equal(t, installation, body.Get("metadata[billingd_installation]"))
	require.Equal(t, installation, body.Get("setup_intent_data[metadata][billingd_installation]"))
	require.Equal(t, "cus_1", body.Get("customer"))
	require.Empty(t, body["customer_account"])
	require.Equal(t, "required", body.Get("consent_collection[terms_of_service]"))
	require.Equal(t, "I agree.", body.Get("custom_text[terms_of_service_acceptance][message]"))
	require.Equal(t, "7", body.Get("setup_intent_data[metadata][setup_session_id]"))
	require.Empty(t, body["ui_mode"])

	a := stripeapi.OnboardingSessionForAccount(installation, 8, "acct_1", "usd", "https://s", "https://c", md, "I agree.")
	require.Equal(t, "billingd-"+installation+"-setup-session:8", *a.IdempotencyKey)
	body = encode(t, a)
	require.Equal(t, "acct_1", body.Get("customer_account"))
	require.Empty(t, body["customer"], "customer_account replaces customer")

	body = encode(t, stripeapi.PaymentMethodAttachToAccount("acct_1"))
	require.Equal(t, "acct_1", body.Get("customer_account"))
	require.Empty(t, body["customer"])
}

// TestAccountsV2ShapesAgainstStripeMock sends the Accounts v2 (customer_account) shapes to
// stripe-mock, which validates them against Stripe's OpenAPI description. stripefake does not
// model Accounts v2.
func TestAccountsV2ShapesAgainstStripeMock(t *testing.T) {
	t.Parallel()
	sc := stripeapi.NewClient("sk_test_conformance", startStripeMock(t), nil, 0)
	ctx := t.Context()
	cs, err := sc.V1CheckoutSessions.Create(ctx, stripeapi.OnboardingSessionForAccount(installation, 9, "acct_1Nv0FGQ9RKHgCVdK", "usd",
		"https://app.example/ok", "https://app.example/cancel", map[string]string{"setup_session_id": "9"}, "I agree to be charged later."))
	require.NoError(t, err, "setup session with customer_account")
	require.NotEmpty(t, cs.ID)
	pm, err := sc.V1PaymentMethods.Attach(ctx, "pm_card_visa", stripeapi.PaymentMethodAttachToAccount("acct_1Nv0FGQ9RKHgCVdK"))
	require.NoError(t, err, "attach with customer_account")
	require.NotEmpty(t, pm.ID)
}
