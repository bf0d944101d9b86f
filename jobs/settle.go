package jobs

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
)

// SettlePaymentIntentTx records what Stripe says about a PaymentIntent that billingd created for
// a charge (metadata charge_id): a late payment_intent.succeeded or payment_intent.payment_failed
// event, or the reconcile job's answer for an attempt whose outcome was unknown. It is idempotent:
// settling an already-settled attempt changes nothing. It returns false when the PaymentIntent
// names no charge that billingd knows.
//
// The attempt is found by the PaymentIntent's id, else by the attempt number in its metadata
// (charge_attempt). A PaymentIntent that names a known charge but none of its off-session
// attempts (a recovery Checkout payment, for one) is not billingd's to settle here: known is
// false. Settling locks the charge; the outcome follows the same rules as the charge job's
// (a decline schedules a retry or recovery, per the decline policy). client inserts the jobs
// that follow; nil takes the client from ctx (inside a River job). d is the Deps the workers were
// registered with: its decline policy and settings apply.
//
// A PaymentIntent whose metadata billingd_installation names another installation (one that
// shares the Stripe account, and has its own charge of the same id) is not billingd's: known is
// false and nothing changes. One without that key (made before PaymentIntents carried it) is
// matched by charge_id and charge_attempt, as before.
//
// Contract shared by the charge issue (which implements it), webhooks and reconcile.
func SettlePaymentIntentTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], d *Deps, pi *stripe.PaymentIntent) (known bool, err error) {
	if pi != nil && d != nil {
		installation, err := d.Installation(ctx)
		if err != nil {
			return false, fmt.Errorf("settle payment intent %s: %w", pi.ID, err)
		}
		if !ours(pi.Metadata, installation) {
			return false, nil
		}
	} else if pi != nil && pi.Metadata[stripeapi.MetadataInstallation] != "" {
		return false, fmt.Errorf("settle payment intent %s: no Deps to compare its installation with", pi.ID)
	}
	label, known, err := chargingOf(d).settlePaymentIntentTx(ctx, tx, client, pi, "webhook")
	if err == nil {
		countOutcome(label)
	}
	return known, err
}

// settlePaymentIntentTx is SettlePaymentIntentTx for a given settler (webhook, reconcile).
func (s *charging) settlePaymentIntentTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], pi *stripe.PaymentIntent, settledBy string) (string, bool, error) {
	if pi == nil || pi.ID == "" {
		return "", false, errors.New("settle payment intent: no PaymentIntent")
	}
	chargeID, err1 := strconv.ParseInt(pi.Metadata[stripeapi.MetadataChargeID], 10, 64)
	attemptNo, err2 := strconv.Atoi(pi.Metadata[MetadataAttempt])
	if err1 != nil || err2 != nil {
		return "", false, nil
	}
	c, err := lockCharge(ctx, tx, chargeID)
	if err != nil || c == nil {
		return "", false, err
	}
	a, err := scanAttempt(tx.QueryRow(ctx, attemptForPIQuery, chargeID, pi.ID, attemptNo))
	if err != nil {
		return "", false, fmt.Errorf("attempt of payment intent %s: %w", pi.ID, err)
	}
	if a == nil {
		s.logger.Warn("payment intent names no attempt of its charge", "charge_id", chargeID,
			"payment_intent_id", pi.ID, "attempt_no", attemptNo)
		return "", false, nil
	}
	ans := fromPaymentIntent(answer{}, pi)
	note := "settled from PaymentIntent " + pi.ID + " (" + string(pi.Status) + ")"
	label, err := s.settleTx(ctx, tx, client, c, a, settleInput{answer: ans, settledBy: settledBy, note: note})
	if err != nil {
		return "", true, err
	}
	return label, true, nil
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
