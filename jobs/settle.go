package jobs

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/stripe/stripe-go/v82"
)

// errNotYet marks contract functions whose implementation lands with its issue.
var errNotYet = errors.New("not implemented yet")

// SettlePaymentIntentTx records what Stripe says about a PaymentIntent that billingd created for
// a charge (metadata charge_id): a late payment_intent.succeeded or payment_intent.payment_failed
// event, or the reconcile job's answer for an attempt whose outcome was unknown. It is idempotent:
// settling an already-settled attempt changes nothing. It returns false when the PaymentIntent
// names no charge that billingd knows.
//
// Contract shared by the charge issue (which implements it), webhooks and reconcile.
func SettlePaymentIntentTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], pi *stripe.PaymentIntent) (known bool, err error) {
	return false, errNotYet
}

// RecoveryPaidTx records that the customer paid a recovery Checkout Session (mode=payment,
// metadata charge_id): the session completes, the charge becomes recovered, the payment method
// used becomes the customer's default, scheduled retries stop; if the charge had already been
// collected, the later payment is refunded (a refund job) and recorded. Idempotent. It returns
// false when the session names no charge that billingd knows.
//
// Contract shared by the recovery issue (which implements it) and webhooks (which calls it).
func RecoveryPaidTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], session *stripe.CheckoutSession) (known bool, err error) {
	return recoveryPaidTx(ctx, tx, client, session)
}
