package jobs

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/metrics"
)

// ExpireRecoveryArgs asks for a recovery Checkout Session to be expired at Stripe so that it
// can no longer be paid: the charge was collected another way, canceled or written off, or the
// session was replaced. The trigger billing.charges_close_recovery inserts it from SQL (args
// {"charge_id": N, "checkout_session_id": "cs_..."}); keep kind and fields stable.
//
// When the customer paid the session before it could be expired, the job records that payment
// through RecoveryPaidTx (which refunds it when the charge was already collected), so a lost
// webhook loses nothing.
type ExpireRecoveryArgs struct {
	ChargeID          int64  `json:"charge_id"`
	CheckoutSessionID string `json:"checkout_session_id"`
}

// Kind is the job kind, also used by billing.charges_close_recovery in SQL.
func (ExpireRecoveryArgs) Kind() string { return "expire_recovery" }

// InsertOpts puts the job on the default queue (as the SQL trigger does).
func (ExpireRecoveryArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueDefault, MaxAttempts: 25}
}

type expireRecoveryWorker struct {
	river.WorkerDefaults[ExpireRecoveryArgs]
	d *Deps
}

// markSessionExpiredQuery records that Stripe expired a session.
const markSessionExpiredQuery = `
update billing.recovery_sessions set status = 'expired', expired_at = now()
where checkout_session_id = $1 and status = 'open'`

// Work expires the session, or records its payment when it was paid meanwhile.
func (w *expireRecoveryWorker) Work(ctx context.Context, job *river.Job[ExpireRecoveryArgs]) error {
	paid, err := closeSession(ctx, w.d, job.Args.CheckoutSessionID)
	if err != nil {
		return fmt.Errorf("expire recovery session %s of charge %d: %w", job.Args.CheckoutSessionID, job.Args.ChargeID, err)
	}
	if paid != nil {
		w.d.Logger.Warn("recovery session was paid before it could be expired", "charge_id", job.Args.ChargeID,
			"checkout_session_id", paid.ID, "job_id", job.ID)
		return recordSessionPaid(ctx, w.d, river.ClientFromContext[pgx.Tx](ctx), paid)
	}
	return nil
}

// closeSession makes sure the session cannot be paid any more: it expires an open session at
// Stripe and records it expired. When Stripe reports the session complete, it returns it (with
// its PaymentIntent) so that the caller records the payment.
func closeSession(ctx context.Context, d *Deps, id string) (paid *stripe.CheckoutSession, err error) {
	cs, err := retrieveSession(ctx, d, id)
	if err != nil {
		return nil, err
	}
	if cs.Status == stripe.CheckoutSessionStatusOpen {
		expired, expErr := expireSession(ctx, d, id)
		if expErr == nil {
			cs = expired
		} else {
			// Paid (or expired) between the read and the expiry? Read again to know.
			again, err := retrieveSession(ctx, d, id)
			if err != nil || again.Status == stripe.CheckoutSessionStatusOpen {
				return nil, expErr
			}
			cs = again
		}
	}
	switch cs.Status {
	case stripe.CheckoutSessionStatusComplete:
		return cs, nil
	case stripe.CheckoutSessionStatusExpired:
		if _, err := d.Pool.Exec(ctx, markSessionExpiredQuery, id); err != nil {
			return nil, fmt.Errorf("record session %s expired: %w", id, err)
		}
		metrics.Recoveries.WithLabelValues("session_expired").Inc()
		return nil, nil
	default:
		return nil, fmt.Errorf("session %s is %q after expiring it", id, cs.Status)
	}
}

// recordSessionPaid records a completed session through RecoveryPaidTx in its own transaction.
func recordSessionPaid(ctx context.Context, d *Deps, client *river.Client[pgx.Tx], cs *stripe.CheckoutSession) error {
	tx, err := d.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	known, err := RecoveryPaidTx(ctx, tx, client, cs)
	if err != nil {
		return err
	}
	if !known {
		return errors.New("the paid session names no charge of billingd's")
	}
	return tx.Commit(ctx)
}
