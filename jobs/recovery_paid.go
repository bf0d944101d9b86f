package jobs

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/metrics"
)

// Queries of RecoveryPaidTx, in the order it runs them. The charge is locked before the
// recovery, as everywhere else.
const (
	paidLockChargeQuery = `
select c.status, c.amount, c.currency, c.customer_id from billing.charges c where c.id = $1 for update`

	paidLockRecoveryQuery = `
select r.round from billing.recoveries r where r.charge_id = $1 for update`

	// paidCompleteSessionQuery completes the session once; an expired one too, since Stripe
	// took the payment, so the money is recorded whatever billingd believed.
	paidCompleteSessionQuery = `
update billing.recovery_sessions
set status = 'completed', completed_at = now(), expired_at = null, payment_intent_id = $2
where checkout_session_id = $1 and charge_id = $3 and status <> 'completed'
returning id`

	paidSessionKnownQuery = `
select exists (select 1 from billing.recovery_sessions where checkout_session_id = $1)`

	// paidRecordForeignSessionQuery records a completed session that billingd has no row for
	// (it named one of billingd's charges in its metadata, so its money is the charge's).
	paidRecordForeignSessionQuery = `
insert into billing.recovery_sessions
    (charge_id, round, seq, checkout_session_id, url, expires_at, idempotency_key, status, completed_at, payment_intent_id)
select $1, $2, coalesce(max(seq), 0) + 1, $3, $4, $5, null, 'completed', now(), $6
from billing.recovery_sessions where charge_id = $1 and round = $2`

	paidChargeRecoveredQuery = `
update billing.charges
set status = 'recovered', status_reason = 'paid through the recovery page', next_attempt_at = null,
    payment_intent_id = $2
where id = $1`

	paidCloseRecoveryQuery = `
update billing.recoveries
set status = 'paid', closed_at = now(), next_reminder_at = null
where charge_id = $1`
)

// recoveryPaidTx implements RecoveryPaidTx.
func recoveryPaidTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], cs *stripe.CheckoutSession) (bool, error) {
	if cs == nil {
		return false, nil
	}
	chargeID, err := strconv.ParseInt(cs.Metadata["charge_id"], 10, 64)
	if err != nil || chargeID <= 0 {
		return false, nil
	}
	if cs.Mode != "" && cs.Mode != stripe.CheckoutSessionModePayment {
		return false, nil
	}
	var status, currency string
	var amount, customerID int64
	err = tx.QueryRow(ctx, paidLockChargeQuery, chargeID).Scan(&status, &amount, &currency, &customerID)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("lock charge %d: %w", chargeID, err)
	}
	var round int
	err = tx.QueryRow(ctx, paidLockRecoveryQuery, chargeID).Scan(&round)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil // the charge never failed: this is not a recovery session of billingd's
	}
	if err != nil {
		return false, fmt.Errorf("lock recovery of charge %d: %w", chargeID, err)
	}
	if cs.Status != stripe.CheckoutSessionStatusComplete || cs.PaymentStatus != stripe.CheckoutSessionPaymentStatusPaid {
		// Completed but not paid yet (a delayed payment method): the money is not here.
		return true, nil
	}
	if cs.PaymentIntent == nil || cs.PaymentIntent.ID == "" {
		return true, fmt.Errorf("recovery session %s of charge %d is paid but names no PaymentIntent", cs.ID, chargeID)
	}
	piID := cs.PaymentIntent.ID
	if cs.AmountTotal != 0 && (cs.AmountTotal != amount || string(cs.Currency) != currency) {
		return true, fmt.Errorf("recovery session %s paid %d %s for charge %d of %d %s", cs.ID, cs.AmountTotal, cs.Currency, chargeID, amount, currency)
	}

	var sessionRow int64
	err = tx.QueryRow(ctx, paidCompleteSessionQuery, cs.ID, piID, chargeID).Scan(&sessionRow)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		var known bool
		if err := tx.QueryRow(ctx, paidSessionKnownQuery, cs.ID).Scan(&known); err != nil {
			return false, fmt.Errorf("find recovery session %s: %w", cs.ID, err)
		}
		if known {
			return true, nil // recorded before: a repeated event
		}
		if _, err := tx.Exec(ctx, paidRecordForeignSessionQuery, chargeID, round, cs.ID, cs.URL,
			time.Unix(cs.ExpiresAt, 0), piID); err != nil {
			return false, fmt.Errorf("record recovery session %s of charge %d: %w", cs.ID, chargeID, err)
		}
	case err != nil:
		return false, fmt.Errorf("complete recovery session %s: %w", cs.ID, err)
	}

	if client == nil {
		client = river.ClientFromContext[pgx.Tx](ctx)
	}
	switch status {
	case "processing", "retry_scheduled", "recovering", "uncollectible":
		if _, err := tx.Exec(ctx, paidChargeRecoveredQuery, chargeID, piID); err != nil {
			return false, fmt.Errorf("mark charge %d recovered: %w", chargeID, err)
		}
		if _, err := tx.Exec(ctx, paidCloseRecoveryQuery, chargeID); err != nil {
			return false, fmt.Errorf("close recovery of charge %d: %w", chargeID, err)
		}
		if err := adoptPaymentMethodTx(ctx, tx, client, chargeID, customerID, cs.PaymentIntent); err != nil {
			return false, err
		}
		metrics.Recoveries.WithLabelValues("recovered").Inc()
	case "succeeded", "recovered":
		if _, err := refundPaymentTx(ctx, tx, client, chargeID, piID, cs.ID, amount, currency, refundAlreadyCollected); err != nil {
			return false, err
		}
	case "canceled":
		if _, err := refundPaymentTx(ctx, tx, client, chargeID, piID, cs.ID, amount, currency, refundChargeCanceled); err != nil {
			return false, err
		}
	default:
		return true, fmt.Errorf("recovery session %s paid charge %d, which is %s", cs.ID, chargeID, status)
	}
	return true, nil
}
