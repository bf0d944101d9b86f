package jobs

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/metrics"
)

// notifyRecoveryWorker opens the first recovery session of a round and tells the customer.
//
// Running it twice is harmless: the session's idempotency key is fixed by the database (charge,
// round, recoveries.next_session_seq), so a retry gets the same session from Stripe and records
// it once; the notifications have
// dedupe keys per (charge, round, channel); and the job completes in the transaction that
// writes them.
type notifyRecoveryWorker struct {
	river.WorkerDefaults[NotifyRecoveryArgs]
	d *Deps
}

// setNextReminderQuery schedules the first reminder of a round (null: none).
const setNextReminderQuery = `
update billing.recoveries set next_reminder_at = $2 where charge_id = $1 and status = 'open'`

// Work creates the session (when the round has none yet), then records it, the notifications
// and their delivery jobs in one transaction.
func (w *notifyRecoveryWorker) Work(ctx context.Context, job *river.Job[NotifyRecoveryArgs]) error {
	d := w.d
	log := d.Logger.With("charge_id", job.Args.ChargeID, "round", job.Args.Round, "job_id", job.ID)
	s, found, err := loadRecovery(ctx, d.Pool, recoveryByChargeQuery, job.Args.ChargeID)
	if err != nil {
		return err
	}
	if !found {
		return river.JobCancel(fmt.Errorf("charge %d has no recovery", job.Args.ChargeID))
	}
	if s.Round != job.Args.Round || !s.collectable() {
		log.Info("recovery notification not needed", "recovery_status", s.Status, "charge_status", s.ChargeStatus)
		return nil
	}

	var cs *stripe.CheckoutSession
	var key string
	seq := s.NextSeq
	if s.SessionSeq == 0 {
		if cs, key, err = newSession(ctx, d, s, seq); err != nil {
			if isPermanentStripeError(err) {
				log.Error("recovery session refused by Stripe", "error", err)
				return river.JobCancel(err)
			}
			return err
		}
	}

	tx, err := d.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	client := river.ClientFromContext[pgx.Tx](ctx)
	open := true
	if cs != nil {
		_, open, err = storeSessionTx(ctx, tx, client, s, seq, cs, key)
	} else {
		open, err = recoveryStillOpenTx(ctx, tx, s)
	}
	if err != nil {
		return err
	}
	if open {
		now := time.Now()
		payBy := s.OpenedAt.Add(d.Config.RecoveryWindow)
		rows, err := composeRecovery(d.Config, recoveryNotice{
			ChargeID: s.ChargeID, Round: s.Round, CustomerID: s.CustomerID, CustomerRef: s.CustomerRef,
			Email: s.Email, Amount: s.Amount, Currency: s.Currency, Description: s.Description,
			Reason: s.Reason, Link: recoveryLink(d.Config, s.Token), PayBy: payBy,
		})
		if err != nil {
			return river.JobCancel(err)
		}
		n, err := insertOutboxTx(ctx, tx, client, rows)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, setNextReminderQuery, s.ChargeID, nextReminder(d, now, payBy)); err != nil {
			return fmt.Errorf("schedule reminder for charge %d: %w", s.ChargeID, err)
		}
		if len(rows) == 0 {
			log.Warn("no notification channel for recovery: set BILLING_SMTP_URL or BILLING_NOTIFY_URL")
		}
		log.Info("recovery notified", "notifications", n)
	}
	if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, job); err != nil {
		return fmt.Errorf("complete notify_recovery job: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit recovery notification for charge %d: %w", s.ChargeID, err)
	}
	if open {
		metrics.Recoveries.WithLabelValues("notified").Inc()
	}
	return nil
}

// recoveryStillOpenTx locks s's recovery and reports whether it is still open in s's round.
func recoveryStillOpenTx(ctx context.Context, tx pgx.Tx, s recoveryState) (bool, error) {
	var status string
	var round int
	if err := tx.QueryRow(ctx, lockRecoveryQuery, s.ChargeID).Scan(&status, &round); err != nil {
		return false, fmt.Errorf("lock recovery of charge %d: %w", s.ChargeID, err)
	}
	return status == "open" && round == s.Round, nil
}

// nextReminder returns when the next reminder is due after now, or nil when reminders are off
// or the next one would come after the recovery window ends.
func nextReminder(d *Deps, now, payBy time.Time) *time.Time {
	if d.Config.RecoveryReminderInterval <= 0 {
		return nil
	}
	t := now.Add(d.Config.RecoveryReminderInterval)
	if !t.Before(payBy) {
		return nil
	}
	return &t
}

// isPermanentStripeError reports a Stripe refusal that no retry of the same request can change
// (a 4xx other than 409 key-in-use and 429 rate limit).
func isPermanentStripeError(err error) bool {
	var serr *stripe.Error
	return errors.As(err, &serr) && serr.HTTPStatusCode >= 400 && serr.HTTPStatusCode < 500 &&
		serr.HTTPStatusCode != http.StatusConflict && serr.HTTPStatusCode != http.StatusTooManyRequests
}
