package jobs

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/robfig/cron/v3"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
)

// ReconcileArgs asks for charge attempts whose outcome is unknown, or in flight for longer than
// Config.ReconcileAfter, to be settled from Stripe. With ChargeID it settles that charge's open
// attempt; without, it sweeps every such attempt (a periodic job, Config.ReconcileSchedule) and
// also re-enqueues charges that are due but have no charge job waiting (a job lost to a crash).
type ReconcileArgs struct {
	ChargeID int64 `json:"charge_id,omitempty"`
}

// Kind is the job kind.
func (ReconcileArgs) Kind() string { return "reconcile_charges" }

// InsertOpts puts reconcile jobs on the default queue. They are not River-unique: a unique job
// left running by a killed process would block its successors until River's rescuer came
// (unique states always include running). Sweeps exclude each other with an advisory lock
// instead, which dies with its connection; a charge reconciled twice at once is harmless.
func (ReconcileArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueDefault, MaxAttempts: 10}
}

// ReconcileWorker settles attempts from what Stripe knows, never by guessing:
//
//   - by the PaymentIntent's id when the attempt has one;
//   - else by searching PaymentIntents by metadata charge_id and billingd_installation (and
//     charge_attempt), so that another installation's PaymentIntent for its charge of the same
//     id, in a Stripe account that both share, is never taken for this one's;
//   - else, while the idempotency key is surely still kept (under 23 hours), by sending the
//     attempt's request again with its key, which returns what the first one did or does it once;
//   - else, once the key has surely expired (over 25 hours) and search finds nothing, nothing was
//     charged: the attempt failed and the charge is retried with a new attempt and a new key.
type ReconcileWorker struct {
	river.WorkerDefaults[ReconcileArgs]
	deps     *Deps
	charging *charging
}

// sweepLockKey is the advisory lock that keeps one reconcile sweep at a time across replicas.
const sweepLockKey int64 = 0x62696c6c7265636f // "billreco"

// sweepBatch bounds the attempts and stalled charges one sweep handles; the next sweep takes
// the rest.
const sweepBatch = 500

const (
	staleAttemptsQuery = `
select a.charge_id
from billing.charge_attempts a
where a.outcome in ('in_flight', 'unknown')
  and coalesce(a.last_try_at, a.started_at) < now() - make_interval(secs => $1)
order by coalesce(a.last_try_at, a.started_at)
limit $2`

	openAttemptNoLockQuery = attemptColumns + `
where a.charge_id = $1 and a.outcome in ('in_flight', 'unknown')`

	// stalledChargesQuery finds due charges with no charge job waiting for them: their job
	// was lost (a crash while it ran, before River's rescuer gets to it, or a discarded job).
	// A job still running elsewhere would find the charge locked or settled: harmless. The
	// waiting jobs are read once (a hashed NOT IN), not once per charge.
	stalledChargesQuery = `
with waiting as materialized (
    select (j.args ->> 'charge_id')::bigint as charge_id
    from river_job j
    where j.kind = 'charge' and j.state in ('available', 'pending', 'scheduled', 'retryable')
)
select c.id
from billing.charges c
where ((c.status = 'pending' and c.created_at < now() - make_interval(secs => $1))
       or (c.status = 'retry_scheduled' and c.next_attempt_at < now() - make_interval(secs => $1)))
  and c.id not in (select charge_id from waiting where charge_id is not null)
order by c.id
limit $2`
)

// Work settles one charge's open attempt, or sweeps.
func (w *ReconcileWorker) Work(ctx context.Context, job *river.Job[ReconcileArgs]) error {
	if job.Args.ChargeID != 0 {
		return w.reconcileCharge(ctx, job.Args.ChargeID)
	}
	conn, err := w.deps.Pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("reconcile sweep: %w", err)
	}
	defer conn.Release()
	var locked bool
	if err := conn.QueryRow(ctx, `select pg_try_advisory_lock($1)`, sweepLockKey).Scan(&locked); err != nil {
		return fmt.Errorf("reconcile sweep lock: %w", err)
	}
	if !locked {
		w.deps.Logger.Info("reconcile sweep already running elsewhere; skipped")
		return nil
	}
	defer conn.Exec(context.WithoutCancel(ctx), `select pg_advisory_unlock($1)`, sweepLockKey) //nolint:errcheck // the lock also dies with the connection

	after := w.deps.Config.ReconcileAfter.Seconds()
	rows, err := w.deps.Pool.Query(ctx, staleAttemptsQuery, after, sweepBatch)
	if err != nil {
		return fmt.Errorf("find attempts to reconcile: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return fmt.Errorf("find attempts to reconcile: %w", err)
	}
	var errs []error
	for _, id := range ids {
		if err := w.reconcileCharge(ctx, id); err != nil {
			w.deps.Logger.Warn("reconcile charge failed; the next sweep tries again", "charge_id", id, "error", err)
			errs = append(errs, err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	if err := w.requeueStalled(ctx, after); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 && len(errs) == len(ids) {
		return errors.Join(errs...) // nothing worked: let River retry the sweep
	}
	return nil
}

func (w *ReconcileWorker) requeueStalled(ctx context.Context, after float64) error {
	tx, err := w.deps.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin requeue: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit it is a no-op
	rows, err := tx.Query(ctx, stalledChargesQuery, after, sweepBatch)
	if err != nil {
		return fmt.Errorf("find stalled charges: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return fmt.Errorf("find stalled charges: %w", err)
	}
	if len(ids) == 0 {
		return nil
	}
	params := make([]river.InsertManyParams, len(ids))
	for i, id := range ids {
		params[i] = river.InsertManyParams{Args: ChargeArgs{ChargeID: id}}
	}
	if _, err := river.ClientFromContext[pgx.Tx](ctx).InsertManyTx(ctx, tx, params); err != nil {
		return fmt.Errorf("requeue stalled charges: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit requeue: %w", err)
	}
	w.deps.Logger.Warn("requeued charges whose job was lost", "count", len(ids), "first_charge_id", ids[0])
	return nil
}

// reconcileCharge settles the charge's open attempt, if it still has one.
func (w *ReconcileWorker) reconcileCharge(ctx context.Context, chargeID int64) error {
	a, err := scanAttempt(w.deps.Pool.QueryRow(ctx, openAttemptNoLockQuery, chargeID))
	if err != nil {
		return fmt.Errorf("open attempt of charge %d: %w", chargeID, err)
	}
	if a == nil {
		return nil
	}
	log := w.deps.Logger.With("charge_id", chargeID, "attempt_no", a.attemptNo)

	pi, err := w.findPaymentIntent(ctx, a)
	if err != nil {
		return err
	}
	if pi != nil {
		return w.settle(ctx, a, settleInput{answer: fromPaymentIntent(answer{}, pi), settledBy: "reconcile",
			note: "reconciled from PaymentIntent " + pi.ID + " (" + string(pi.Status) + ")"})
	}
	age := time.Since(a.startedAt)
	switch {
	case age < keyReplayWindow:
		return w.replay(ctx, a)
	case age > keyExpiredAfter:
		log.Warn("no PaymentIntent for an attempt whose key expired; retrying the charge with a new attempt")
		return w.settle(ctx, a, settleInput{answer: answer{verdict: verdictNoPayment,
			message: "no PaymentIntent at Stripe"}, settledBy: "reconcile",
			note: "no PaymentIntent found by search after the idempotency key expired"})
	default:
		log.Info("attempt key may be expiring; waiting until it surely has before retrying", "age", age)
		return nil
	}
}

// findPaymentIntent reads the attempt's PaymentIntent by id, or searches for it by metadata.
func (w *ReconcileWorker) findPaymentIntent(ctx context.Context, a *attemptRow) (*stripe.PaymentIntent, error) {
	if a.paymentIntentID != nil {
		pi, err := w.deps.Stripe.V1PaymentIntents.Retrieve(ctx, *a.paymentIntentID, nil)
		if err != nil {
			return nil, fmt.Errorf("retrieve payment intent %s of charge %d: %w", *a.paymentIntentID, a.chargeID, err)
		}
		return pi, nil
	}
	want := strconv.Itoa(a.attemptNo)
	// The installation that the attempt's key names is the one its PaymentIntent carries
	// (sendPaymentIntent): this installation's, or none for an attempt recorded before keys and
	// PaymentIntents named one. Such a legacy attempt is searched by charge_id alone, as before,
	// and only PaymentIntents without an installation are taken for it.
	installation := stripeapi.KeyInstallation(a.key)
	search := stripeapi.PaymentIntentSearchByCharge(installation, strconv.FormatInt(a.chargeID, 10))
	var found *stripe.PaymentIntent
	for pi, err := range w.deps.Stripe.V1PaymentIntents.Search(ctx, search) {
		if err != nil {
			return nil, fmt.Errorf("search payment intents of charge %d: %w", a.chargeID, err)
		}
		if pi.Metadata[MetadataAttempt] == want && pi.Metadata[stripeapi.MetadataInstallation] == installation {
			found = pi
			break
		}
	}
	return found, nil
}

// replay sends the attempt's request again with its own key and settles what comes back.
func (w *ReconcileWorker) replay(ctx context.Context, a *attemptRow) error {
	tx, err := w.deps.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin replay of charge %d: %w", a.chargeID, err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit it is a no-op
	if _, err := lockCharge(ctx, tx, a.chargeID); err != nil {
		return err
	}
	locked, err := scanAttempt(tx.QueryRow(ctx, attemptByIDQuery, a.id))
	if err != nil {
		return fmt.Errorf("lock attempt of charge %d: %w", a.chargeID, err)
	}
	if locked == nil || !locked.open() {
		return nil // settled meanwhile
	}
	if _, err := tx.Exec(ctx, bumpTriesQuery, a.id, nil); err != nil {
		return fmt.Errorf("count try of charge %d: %w", a.chargeID, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit replay of charge %d: %w", a.chargeID, err)
	}
	ans := sendPaymentIntent(ctx, w.deps, planFromAttempt(w.deps, locked))
	w.deps.Logger.Info("reconcile replayed an attempt's key", "charge_id", a.chargeID, "attempt_no", a.attemptNo,
		"http_status", ans.httpStatus, "stripe_request_id", ans.requestID)
	return w.settle(context.WithoutCancel(ctx), a, settleInput{answer: ans, settledBy: "reconcile",
		note: "reconciled by replaying the idempotency key"})
}

// settle writes an answer for the attempt under the charge's lock.
func (w *ReconcileWorker) settle(ctx context.Context, a *attemptRow, in settleInput) error {
	tx, err := w.deps.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin reconcile of charge %d: %w", a.chargeID, err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit it is a no-op
	c, err := lockCharge(ctx, tx, a.chargeID)
	if err != nil {
		return err
	}
	locked, err := scanAttempt(tx.QueryRow(ctx, attemptByIDQuery, a.id))
	if err != nil {
		return fmt.Errorf("lock attempt of charge %d: %w", a.chargeID, err)
	}
	if c == nil || locked == nil {
		return nil
	}
	label, err := w.charging.settleTx(ctx, tx, nil, c, locked, in)
	if err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit reconcile of charge %d: %w", a.chargeID, err)
	}
	countOutcome(label)
	return nil
}

// reconcilePeriodic is the sweep's periodic trigger.
func reconcilePeriodic(schedule string) (*river.PeriodicJob, error) {
	sched, err := cron.ParseStandard(schedule)
	if err != nil {
		return nil, fmt.Errorf("reconcile schedule %q: %w", schedule, err)
	}
	return river.NewPeriodicJob(sched, func() (river.JobArgs, *river.InsertOpts) {
		return ReconcileArgs{}, nil
	}, &river.PeriodicJobOpts{ID: "reconcile_charges", RunOnStart: true}), nil
}
