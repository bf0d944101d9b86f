package jobs

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/robfig/cron/v3"

	"github.com/billingd/billingd/internal/metrics"
)

// RecoverySweepArgs triggers the recovery sweep: reminders that are due, charges whose recovery
// window has ended (written off as uncollectible), and sessions past their expiry. It is a
// periodic job (BILLING_RECOVERY_SCHEDULE); what it acts on lives in the database, so a missed
// or repeated run changes nothing twice.
type RecoverySweepArgs struct{}

// Kind is the job kind.
func (RecoverySweepArgs) Kind() string { return "recovery_sweep" }

// InsertOpts puts the sweep on the default queue.
func (RecoverySweepArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueDefault, MaxAttempts: 3}
}

// recoverySweepPeriodic returns the periodic job of the sweep.
func recoverySweepPeriodic(d *Deps) (*river.PeriodicJob, error) {
	sched, err := cron.ParseStandard(d.Config.RecoverySchedule)
	if err != nil {
		return nil, fmt.Errorf("BILLING_RECOVERY_SCHEDULE: %w", err)
	}
	return river.NewPeriodicJob(sched, func() (river.JobArgs, *river.InsertOpts) {
		return RecoverySweepArgs{}, nil
	}, &river.PeriodicJobOpts{RunOnStart: true}), nil
}

type recoverySweepWorker struct {
	river.WorkerDefaults[RecoverySweepArgs]
	d *Deps
}

// recoverySweepBatch bounds the rows one transaction of the sweep locks.
const recoverySweepBatch = 500

const (
	// sweepWriteOffQuery writes off a batch of charges whose recovery has been open longer
	// than the window. The close trigger then closes their recoveries as uncollectible and
	// expires their open sessions. A charge whose attempt is in flight (processing) waits for
	// the next sweep.
	sweepWriteOffQuery = `
with due as (
    select c.id
    from billing.recoveries r
    join billing.charges c on c.id = r.charge_id
    where r.status = 'open' and r.opened_at <= $1 and c.status in ('recovering', 'retry_scheduled')
    order by r.opened_at
    limit $2
    for update of c skip locked
)
update billing.charges c
set status = 'uncollectible', status_reason = 'not paid within the recovery window', next_attempt_at = null
from due
where c.id = due.id
returning c.id, c.source, coalesce(c.source_id, 0)`

	// sweepPausePlansQuery pauses the installment plans of written-off installments
	// (BILLING_RECOVERY_PLAN_ON_UNCOLLECTIBLE=pause).
	sweepPausePlansQuery = `
update billing.installment_plans set status = 'paused', updated_at = now()
where id = any($1) and status = 'active'`

	// sweepRemindersQuery takes a batch of recoveries whose reminder is due.
	sweepRemindersQuery = recoveryStateColumns + `
where r.status = 'open' and r.next_reminder_at <= now()
  and c.status in ('pending', 'processing', 'retry_scheduled', 'recovering')
order by r.next_reminder_at
limit $1
for update of r skip locked`

	sweepReminderSentQuery = `
update billing.recoveries set reminders_sent = $2, next_reminder_at = $3 where charge_id = $1`

	// sweepExpiredSessionsQuery records sessions that Stripe has expired by time (an hour of
	// margin for clocks). A payment that still arrives completes the session all the same.
	sweepExpiredSessionsQuery = `
update billing.recovery_sessions set status = 'expired', expired_at = now()
where status = 'open' and expires_at < now() - interval '1 hour'`
)

// Work runs the three parts of the sweep, each in bounded batches.
func (w *recoverySweepWorker) Work(ctx context.Context, job *river.Job[RecoverySweepArgs]) error {
	client := river.ClientFromContext[pgx.Tx](ctx)
	wroteOff, err := w.writeOff(ctx)
	if err != nil {
		return err
	}
	reminded, err := w.remind(ctx, client)
	if err != nil {
		return err
	}
	tag, err := w.d.Pool.Exec(ctx, sweepExpiredSessionsQuery)
	if err != nil {
		return fmt.Errorf("record expired recovery sessions: %w", err)
	}
	if wroteOff+reminded+int(tag.RowsAffected()) > 0 {
		w.d.Logger.Info("recovery sweep", "written_off", wroteOff, "reminded", reminded,
			"sessions_expired", tag.RowsAffected(), "job_id", job.ID)
	}
	return nil
}

func (w *recoverySweepWorker) writeOff(ctx context.Context) (int, error) {
	total := 0
	for {
		cutoff := time.Now().Add(-w.d.Config.RecoveryWindow)
		n, err := w.writeOffBatch(ctx, cutoff)
		if err != nil {
			return total, err
		}
		total += n
		if n < recoverySweepBatch {
			return total, nil
		}
	}
}

func (w *recoverySweepWorker) writeOffBatch(ctx context.Context, cutoff time.Time) (int, error) {
	tx, err := w.d.Pool.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	rows, err := tx.Query(ctx, sweepWriteOffQuery, cutoff, recoverySweepBatch)
	if err != nil {
		return 0, fmt.Errorf("write off charges: %w", err)
	}
	var n int
	var plans []int64
	for rows.Next() {
		var id, sourceID int64
		var source string
		if err := rows.Scan(&id, &source, &sourceID); err != nil {
			rows.Close()
			return 0, fmt.Errorf("write off charges: %w", err)
		}
		n++
		if source == "installment" && sourceID != 0 {
			plans = append(plans, sourceID)
		}
		w.d.Logger.Warn("charge written off: recovery window ended", "charge_id", id)
	}
	if err := rows.Err(); err != nil {
		return 0, fmt.Errorf("write off charges: %w", err)
	}
	if len(plans) > 0 && w.d.Config.RecoveryPlanOnUncollectible == "pause" {
		if _, err := tx.Exec(ctx, sweepPausePlansQuery, plans); err != nil {
			return 0, fmt.Errorf("pause installment plans: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("commit write-offs: %w", err)
	}
	metrics.Recoveries.WithLabelValues("uncollectible").Add(float64(n))
	return n, nil
}

func (w *recoverySweepWorker) remind(ctx context.Context, client *river.Client[pgx.Tx]) (int, error) {
	total := 0
	for {
		n, err := w.remindBatch(ctx, client)
		if err != nil {
			return total, err
		}
		total += n
		if n < recoverySweepBatch {
			return total, nil
		}
	}
}

func (w *recoverySweepWorker) remindBatch(ctx context.Context, client *river.Client[pgx.Tx]) (int, error) {
	d := w.d
	tx, err := d.Pool.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	rows, err := tx.Query(ctx, sweepRemindersQuery, recoverySweepBatch)
	if err != nil {
		return 0, fmt.Errorf("find due reminders: %w", err)
	}
	var due []recoveryState
	for rows.Next() {
		s, err := scanRecovery(rows)
		if err != nil {
			rows.Close()
			return 0, fmt.Errorf("find due reminders: %w", err)
		}
		due = append(due, s)
	}
	if err := rows.Err(); err != nil {
		return 0, fmt.Errorf("find due reminders: %w", err)
	}
	now := time.Now()
	var outbox []outboxRow
	for _, s := range due {
		payBy := s.OpenedAt.Add(d.Config.RecoveryWindow)
		n := s.RemindersSent + 1
		msgs, err := composeRecovery(d.Config, recoveryNotice{
			ChargeID: s.ChargeID, Round: s.Round, Reminder: n, CustomerID: s.CustomerID, CustomerRef: s.CustomerRef,
			Email: s.Email, Amount: s.Amount, Currency: s.Currency, Description: s.Description,
			Reason: s.Reason, Link: recoveryLink(d.Config, s.Token), PayBy: payBy,
		})
		if err != nil {
			return 0, err
		}
		outbox = append(outbox, msgs...)
		if _, err := tx.Exec(ctx, sweepReminderSentQuery, s.ChargeID, n, nextReminder(d, now, payBy)); err != nil {
			return 0, fmt.Errorf("record reminder of charge %d: %w", s.ChargeID, err)
		}
	}
	if _, err := insertOutboxTx(ctx, tx, client, outbox); err != nil {
		return 0, err
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("commit reminders: %w", err)
	}
	metrics.Recoveries.WithLabelValues("reminded").Add(float64(len(due)))
	return len(due), nil
}
