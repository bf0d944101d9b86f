package jobs

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/metrics"
)

// RefundPaymentArgs asks for one row of billing.refunds to be refunded at Stripe.
type RefundPaymentArgs struct {
	RefundID int64 `json:"refund_id"`
}

// Kind is the job kind.
func (RefundPaymentArgs) Kind() string { return "refund_payment" }

// InsertOpts puts refunds on the default queue.
func (RefundPaymentArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueDefault, MaxAttempts: 25}
}

// Reasons for a refund, as stored in billing.refunds.reason.
const (
	refundAlreadyCollected = "already_collected"
	refundChargeCanceled   = "charge_canceled"
)

// insertRefundQuery records a refund once per PaymentIntent: the same payment refunded twice
// (a repeated event, a job run twice) inserts nothing.
const insertRefundQuery = `
insert into billing.refunds (charge_id, payment_intent_id, checkout_session_id, amount, currency, reason, idempotency_key)
values ($1, $2, nullif($3, ''), $4, $5, $6, 'billingd-refund-' || $2)
on conflict (payment_intent_id) do nothing
returning id`

// RefundDuplicateTx records, in the caller's transaction, that paymentIntentID collected
// chargeID a second time (amount and currency as charged), and inserts a refund_payment job
// that refunds it at Stripe with an idempotency key of its own. Idempotent: the same
// PaymentIntent is refunded once. It needs a River client in ctx or passed as client.
//
// The charge job calls it when an attempt that was in flight succeeds after the charge was
// collected another way (the customer paid through the recovery page meanwhile) or canceled;
// the refund's reason follows the charge's status.
func RefundDuplicateTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], chargeID int64, paymentIntentID string, amount int64, currency string) (inserted bool, err error) {
	var status string
	if err := tx.QueryRow(ctx, `select status from billing.charges where id = $1`, chargeID).Scan(&status); err != nil {
		return false, fmt.Errorf("read charge %d: %w", chargeID, err)
	}
	reason := refundAlreadyCollected
	if status == "canceled" {
		reason = refundChargeCanceled
	}
	return refundPaymentTx(ctx, tx, client, chargeID, paymentIntentID, "", amount, currency, reason)
}

func refundPaymentTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], chargeID int64, piID, sessionID string, amount int64, currency, reason string) (bool, error) {
	var id int64
	err := tx.QueryRow(ctx, insertRefundQuery, chargeID, piID, sessionID, amount, currency, reason).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("record refund of %s for charge %d: %w", piID, chargeID, err)
	}
	if client == nil {
		client = river.ClientFromContext[pgx.Tx](ctx)
	}
	if _, err := client.InsertTx(ctx, tx, RefundPaymentArgs{RefundID: id}, nil); err != nil {
		return false, fmt.Errorf("insert refund_payment for charge %d: %w", chargeID, err)
	}
	return true, nil
}

type refundPaymentWorker struct {
	river.WorkerDefaults[RefundPaymentArgs]
	d *Deps
}

const (
	loadRefundQuery = `
select charge_id, payment_intent_id, amount, reason, idempotency_key, status from billing.refunds where id = $1`
	refundSucceededQuery = `
update billing.refunds set status = 'succeeded', stripe_refund_id = $2, refunded_at = now(), last_error = null
where id = $1 and status <> 'succeeded'`
	refundFailedQuery = `
update billing.refunds set status = case when $3 then 'failed' else status end, last_error = $2
where id = $1 and status = 'pending'`
)

// Work refunds the payment in full at Stripe with the row's idempotency key (a retry replays
// the same refund) and records the result. A refund Stripe refuses for good (already refunded
// in the Dashboard, a disputed payment) is marked failed for a person to look at.
func (w *refundPaymentWorker) Work(ctx context.Context, job *river.Job[RefundPaymentArgs]) error {
	id := job.Args.RefundID
	var chargeID, amount int64
	var piID, reason, key, status string
	err := w.d.Pool.QueryRow(ctx, loadRefundQuery, id).Scan(&chargeID, &piID, &amount, &reason, &key, &status)
	if errors.Is(err, pgx.ErrNoRows) {
		return river.JobCancel(fmt.Errorf("refund %d does not exist", id))
	}
	if err != nil {
		return fmt.Errorf("load refund %d: %w", id, err)
	}
	if status == "succeeded" {
		return nil
	}
	log := w.d.Logger.With("charge_id", chargeID, "refund_id", id, "job_id", job.ID)
	re, err := createRefund(ctx, w.d, piID, key, map[string]string{
		"charge_id": strconv.FormatInt(chargeID, 10), "billingd_refund_id": strconv.FormatInt(id, 10), "reason": reason,
	})
	if err != nil {
		var serr *stripe.Error
		permanent := errors.As(err, &serr) && serr.HTTPStatusCode >= 400 && serr.HTTPStatusCode < 500 &&
			serr.HTTPStatusCode != 409 && serr.HTTPStatusCode != 429
		last := permanent || job.Attempt >= job.MaxAttempts
		if _, dbErr := w.d.Pool.Exec(ctx, refundFailedQuery, id, truncate(err.Error(), 500), last); dbErr != nil {
			return errors.Join(err, dbErr)
		}
		log.Error("refund not made", "payment_intent_id", piID, "final", last, "error", err)
		if permanent {
			return river.JobCancel(fmt.Errorf("refund %s: %w", piID, err))
		}
		return fmt.Errorf("refund %s: %w", piID, err)
	}
	if _, err := w.d.Pool.Exec(ctx, refundSucceededQuery, id, re.ID); err != nil {
		return fmt.Errorf("record refund %d: %w", id, err)
	}
	metrics.Recoveries.WithLabelValues("refunded").Inc()
	log.Warn("second payment refunded", "payment_intent_id", piID, "stripe_refund_id", re.ID, "amount", amount, "reason", reason)
	return nil
}
