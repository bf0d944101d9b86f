package stripeapi

import "github.com/stripe/stripe-go/v82"

// OffSessionPaymentIntentForAccount is OffSessionPaymentIntent for a customer modelled as an
// Accounts v2 customer-configured Account: customer_account (sent with AddExtra) instead of
// customer. Preview: stripefake does not model it; the shape is checked against stripe-mock.
func OffSessionPaymentIntentForAccount(accountID, paymentMethodID string, amount int64, currency, description string, metadata map[string]string, idempotencyKey string) *stripe.PaymentIntentCreateParams {
	p := OffSessionPaymentIntent("", paymentMethodID, amount, currency, description, metadata, idempotencyKey)
	p.Customer = nil
	p.AddExtra(ExtraCustomerAccount, accountID)
	return p
}
