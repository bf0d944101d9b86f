package stripeapi_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/stripeapi"
)

func TestOffSessionPaymentIntentForAccount(t *testing.T) {
	t.Parallel()
	md := map[string]string{"charge_id": "5", "source": "adhoc", "charge_attempt": "1"}
	p := stripeapi.OffSessionPaymentIntentForAccount("acct_1", "pm_1", 1999, "EUR", "Top-up", md, "billingd-charge-5-attempt-1")
	require.Equal(t, "billingd-charge-5-attempt-1", *p.IdempotencyKey)
	body := encode(t, p)
	require.Equal(t, "acct_1", body.Get("customer_account"))
	require.Empty(t, body["customer"], "customer_account replaces customer")
	require.Equal(t, "pm_1", body.Get("payment_method"))
	require.Equal(t, "true", body.Get("off_session"))
	require.Equal(t, "true", body.Get("confirm"))
	require.Equal(t, "1999", body.Get("amount"))
	require.Equal(t, "eur", body.Get("currency"))
	require.Equal(t, "5", body.Get("metadata[charge_id]"))

	sc := stripeapi.NewClient("sk_test_conformance", startStripeMock(t), nil, 0)
	pi, err := sc.V1PaymentIntents.Create(t.Context(), stripeapi.OffSessionPaymentIntentForAccount("acct_1Nv0FGQ9RKHgCVdK",
		"pm_card_visa", 1999, "eur", "Top-up", md, "billingd-charge-5-attempt-1"))
	require.NoError(t, err, "stripe-mock accepts the shape")
	require.NotEmpty(t, pi.ID)
}
