package jobs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
	"github.com/robfig/cron/v3"

	"github.com/billingd/billingd/internal/metrics"
)

// DueArgs is the trigger of the due computation, inserted by River's periodic scheduler on the
// elected leader (cadence: BILLING_DUE_SCHEDULE). It carries nothing: what is due lives in the
// database (next_due_at, balances), so a run that is late, repeated, or run on two replicas at
// once charges every period once.
type DueArgs struct{}

// Kind is the job kind.
func (DueArgs) Kind() string { return "due" }

// InsertOpts keeps at most one due job waiting or running: a tick that comes while a run is
// still going inserts nothing, since that run will see what the tick would have.
func (DueArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{
		Queue:       QueueDefault,
		MaxAttempts: 3,
		UniqueOpts: river.UniqueOpts{ByState: []rivertype.JobState{
			rivertype.JobStateAvailable, rivertype.JobStatePending,
			rivertype.JobStateRunning, rivertype.JobStateScheduled,
		}},
	}
}

// dueWorkers is how many batch transactions a due run keeps in flight: two overlap one batch's
// Go work (building and copying its charge jobs) with the next batch's statement in PostgreSQL.
const dueWorkers = 2

// DueWorker runs the due computation for one DueArgs job.
type DueWorker struct {
	river.WorkerDefaults[DueArgs]
	deps *Deps
}

// NewDueWorker returns the worker of DueArgs jobs.
func NewDueWorker(d *Deps) *DueWorker { return &DueWorker{deps: d} }

// Timeout lets a run go on as long as there is work: each batch is its own short transaction,
// and the run stops between batches when its context ends.
func (w *DueWorker) Timeout(*river.Job[DueArgs]) time.Duration { return -1 }

// Work computes what is due now.
func (w *DueWorker) Work(ctx context.Context, job *river.Job[DueArgs]) error {
	due := &Due{
		Pool:      w.deps.Pool,
		Client:    river.ClientFromContext[pgx.Tx](ctx),
		Logger:    w.deps.Logger.With("job_id", job.ID),
		BatchSize: w.deps.Config.DueBatchSize,
		Workers:   dueWorkers,
	}
	// One clock for every replica: the database's.
	var now time.Time
	if err := w.deps.Pool.QueryRow(ctx, "select now()").Scan(&now); err != nil {
		return fmt.Errorf("due computation: read the database clock: %w", err)
	}
	_, err := due.Run(ctx, now)
	return err
}

// newDuePeriodicJob returns the periodic job that triggers the due computation on the schedule
// in the settings, and once when a leader starts (a restart or a new leader must not wait a
// whole period to catch up).
func newDuePeriodicJob(d *Deps) (*river.PeriodicJob, error) {
	schedule, err := cron.ParseStandard(d.Config.DueSchedule)
	if err != nil {
		return nil, fmt.Errorf("BILLING_DUE_SCHEDULE %q: %w", d.Config.DueSchedule, err)
	}
	return river.NewPeriodicJob(schedule, func() (river.JobArgs, *river.InsertOpts) {
		return DueArgs{}, nil
	}, &river.PeriodicJobOpts{ID: "due", RunOnStart: true}), nil
}

// Due turns what has fallen due into charges and their charge jobs: installments whose date has
// come, scheduled top-ups whose occurrence has come, and threshold top-ups whose customer's
// balance is low. It works in batches of at most BatchSize rows, each one transaction: lock the due
// rows (FOR UPDATE SKIP LOCKED, so concurrent runs share the work and never wait on each other),
// insert their charges (unique per source and period: a second run inserts nothing), advance the
// plans and rules, and insert the charge jobs with River's InsertManyFastTx. Memory holds one
// batch per worker, however many rows are due.
type Due struct {
	Pool      *pgxpool.Pool
	Client    *river.Client[pgx.Tx] // inserts the charge jobs; need not be started
	Logger    *slog.Logger
	BatchSize int // rows per transaction; at least 1
	Workers   int // batch transactions in flight at once; 0 means 1
}

// DueResult counts what one run did.
type DueResult struct {
	Scheduled    int // cron plans and scheduled rules whose first due date was computed
	Invalid      int // plans and rules marked invalid (a cron expression that cannot be used)
	Installments int // installment charges created
	Topups       int // top-up charges created
	Batches      int // transactions committed
}

func (r *DueResult) add(o DueResult) {
	r.Scheduled += o.Scheduled
	r.Invalid += o.Invalid
	r.Installments += o.Installments
	r.Topups += o.Topups
	r.Batches += o.Batches
}

// Run computes everything due at or before now and returns what it did. Missed periods are
// caught up, each once and in order: a plan three periods behind gets three charges, one per
// batch. It returns the first error; batches committed before it stay committed, and the next
// run carries on from the database.
func (d *Due) Run(ctx context.Context, now time.Time) (DueResult, error) {
	if d.BatchSize < 1 {
		return DueResult{}, errors.New("due computation: batch size must be at least 1")
	}
	start := time.Now()
	var total DueResult
	phases := []struct {
		name  string
		batch func(context.Context, time.Time, *dueCursor) (DueResult, int, error)
		multi bool // another keyset pass follows a pass that left rows due again
	}{
		{"schedule installment plans", d.schedulePlansBatch, false},
		{"schedule top-up rules", d.scheduleRulesBatch, false},
		{"installments", d.installmentsBatch, true},
		{"scheduled top-ups", d.scheduledTopupsBatch, true},
		{"threshold top-ups", d.thresholdTopupsBatch, false},
	}
	for _, p := range phases {
		res, err := d.drain(ctx, now, p.batch, p.multi)
		total.add(res)
		if err != nil {
			d.Logger.Error("due computation failed", "phase", p.name, "error", err,
				"installments", total.Installments, "topups", total.Topups, "batches", total.Batches)
			return total, fmt.Errorf("due computation, %s: %w", p.name, err)
		}
	}
	d.Logger.Info("due computation finished",
		"installments", total.Installments, "topups", total.Topups,
		"scheduled", total.Scheduled, "invalid", total.Invalid,
		"batches", total.Batches, "duration", time.Since(start).Round(time.Millisecond))
	return total, nil
}

// dueCursor is a keyset position: batches walk rows in (at, id) order. again records that a
// batch of this pass advanced a row to a date that is still due (a plan several periods behind),
// which may lie behind the cursor: another pass is needed.
type dueCursor struct {
	at    time.Time
	id    int64
	again bool
}

func (c *dueCursor) advance(at time.Time, id int64) {
	if at.After(c.at) || (at.Equal(c.at) && id > c.id) {
		c.at, c.id = at, id
	}
}

// drain runs batch until it finds nothing, on Workers goroutines. A batch returns how many rows it
// locked; zero ends a pass. Each worker keeps its own cursor, and rows another worker holds are
// skipped (SKIP LOCKED), so workers never wait on each other. With multi, a pass that left rows
// due again (a plan several periods behind advances one period per batch) is followed by another
// from the start, since those rows may lie behind the cursor.
func (d *Due) drain(ctx context.Context, now time.Time, batch func(context.Context, time.Time, *dueCursor) (DueResult, int, error), multi bool) (DueResult, error) {
	workers := max(d.Workers, 1)
	var (
		mu       sync.Mutex
		total    DueResult
		firstErr error
		wg       sync.WaitGroup
	)
	parent := ctx
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var cur dueCursor
			for ctx.Err() == nil {
				res, locked, err := batch(ctx, now, &cur)
				mu.Lock()
				total.add(res)
				if err != nil && firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
				if err != nil {
					cancel() // the other workers stop after their current batch
					return
				}
				if locked > 0 {
					continue
				}
				if !multi || !cur.again {
					return
				}
				cur = dueCursor{}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return total, firstErr
	}
	return total, parent.Err()
}

// inTx runs fn in one transaction and commits it.
func (d *Due) inTx(ctx context.Context, fn func(pgx.Tx) error) error {
	tx, err := d.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after Commit this is a no-op
	if err := fn(tx); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// insertChargeJobs inserts one charge job per charge id in tx (COPY FROM through River).
func (d *Due) insertChargeJobs(ctx context.Context, tx pgx.Tx, chargeIDs []int64) error {
	if len(chargeIDs) == 0 {
		return nil
	}
	params := make([]river.InsertManyParams, len(chargeIDs))
	for i, id := range chargeIDs {
		params[i] = river.InsertManyParams{Args: ChargeArgs{ChargeID: id}}
	}
	if _, err := d.Client.InsertManyFastTx(ctx, tx, params); err != nil {
		return fmt.Errorf("insert %d charge jobs: %w", len(chargeIDs), err)
	}
	return nil
}

// scheduleCache parses each (expression, zone) once per batch.
type scheduleCache map[[2]string]scheduleOrErr

type scheduleOrErr struct {
	s   *Schedule
	err error
}

func (c scheduleCache) get(expr, zone string) (*Schedule, error) {
	k := [2]string{expr, zone}
	v, ok := c[k]
	if !ok {
		v.s, v.err = ParseSchedule(expr, zone)
		c[k] = v
	}
	return v.s, v.err
}

// nextDue is a Go-computed due date for a cron plan or rule: a valid time, or a reason to mark
// the row invalid.
type nextDue struct {
	ids     []int64
	next    []pgtype.Timestamptz
	reasons []pgtype.Text
	invalid int
}

func (n *nextDue) add(id int64, at time.Time, err error, what string, logger *slog.Logger, idAttr string) {
	n.ids = append(n.ids, id)
	switch {
	case err != nil:
		n.next = append(n.next, pgtype.Timestamptz{})
		n.reasons = append(n.reasons, pgtype.Text{String: "invalid cron expression: " + err.Error(), Valid: true})
	case at.IsZero():
		n.next = append(n.next, pgtype.Timestamptz{})
		n.reasons = append(n.reasons, pgtype.Text{String: "the cron expression has no " + what + "occurrence within five years", Valid: true})
	default:
		n.next = append(n.next, pgtype.Timestamptz{Time: at, Valid: true})
		n.reasons = append(n.reasons, pgtype.Text{})
		return
	}
	n.invalid++
	logger.Warn("schedule marked invalid", idAttr, id, "reason", n.reasons[len(n.reasons)-1].String)
}

// setPlanScheduleQuery stores Go-computed due dates of cron plans: the first one of a pending
// plan (which becomes active), the next one of a plan just charged, or none with the reason the
// plan is invalid.
const setPlanScheduleQuery = `
update billing.installment_plans p
   set next_due_at   = u.next_due_at,
       status        = case when u.next_due_at is null then 'invalid'
                            when p.status = 'schedule_pending' then 'active' else p.status end,
       status_reason = coalesce(u.reason, p.status_reason),
       updated_at    = now()
  from unnest($1::bigint[], $2::timestamptz[], $3::text[]) as u (id, next_due_at, reason)
 where p.id = u.id`

// setRuleScheduleQuery is setPlanScheduleQuery for scheduled top-up rules.
const setRuleScheduleQuery = `
update billing.topup_rules r
   set next_due_at   = u.next_due_at,
       status        = case when u.next_due_at is null then 'invalid'
                            when r.status = 'schedule_pending' then 'active' else r.status end,
       status_reason = coalesce(u.reason, r.status_reason),
       updated_at    = now()
  from unnest($1::bigint[], $2::timestamptz[], $3::text[]) as u (id, next_due_at, reason)
 where r.id = u.id`

// pendingPlansQuery locks cron plans whose first due date is not computed yet.
const pendingPlansQuery = `
select id, cron_expr, time_zone, starts_at
  from billing.installment_plans
 where status = 'schedule_pending' and id > $1
 order by id
 limit $2
   for update skip locked`

// firstSchedule names what schedulePendingBatch schedules: cron plans created from SQL, whose
// first date is the first at or after their start, or scheduled top-up rules, whose first date
// is the first at or after their creation.
type firstSchedule struct {
	what     string // for errors: "plans", "top-up rules"
	lock     string // locks pending rows: id, cron_expr, time_zone, the time the schedule counts from
	store    string // stores the computed dates (ids, dates, reasons)
	idLogKey string // "plan_id" or "topup_rule_id"
}

var (
	firstSchedulePlans = firstSchedule{"plans", pendingPlansQuery, setPlanScheduleQuery, "plan_id"}
	firstScheduleRules = firstSchedule{"top-up rules", pendingRulesQuery, setRuleScheduleQuery, "topup_rule_id"}
)

// schedulePlansBatch computes the first due date of a batch of cron plans created from SQL
// (status schedule_pending), or marks them invalid. Such a plan becomes active and, when its first
// date is already past, is charged later in the same run.
func (d *Due) schedulePlansBatch(ctx context.Context, _ time.Time, cur *dueCursor) (DueResult, int, error) {
	return d.schedulePendingBatch(ctx, cur, firstSchedulePlans)
}

// scheduleRulesBatch is schedulePlansBatch for scheduled top-up rules.
func (d *Due) scheduleRulesBatch(ctx context.Context, _ time.Time, cur *dueCursor) (DueResult, int, error) {
	return d.schedulePendingBatch(ctx, cur, firstScheduleRules)
}

// schedulePendingBatch locks one batch of pending rows of fs, computes each first due date in Go
// (or the reason the schedule is invalid) and stores them, in one transaction.
func (d *Due) schedulePendingBatch(ctx context.Context, cur *dueCursor, fs firstSchedule) (DueResult, int, error) {
	var res DueResult
	var locked int
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, fs.lock, cur.id, d.BatchSize)
		if err != nil {
			return fmt.Errorf("lock pending %s: %w", fs.what, err)
		}
		var (
			nd         nextDue
			id         int64
			expr, zone string
			from       time.Time
			schedules  = scheduleCache{}
		)
		_, err = pgx.ForEachRow(rows, []any{&id, &expr, &zone, &from}, func() error {
			locked++
			cur.id = id
			s, perr := schedules.get(expr, zone)
			var first time.Time
			if perr == nil {
				first = s.First(from)
			}
			nd.add(id, first, perr, "", d.Logger, fs.idLogKey)
			return nil
		})
		if err != nil {
			return fmt.Errorf("read pending %s: %w", fs.what, err)
		}
		if locked == 0 {
			return nil
		}
		if _, err := tx.Exec(ctx, fs.store, nd.ids, nd.next, nd.reasons); err != nil {
			return fmt.Errorf("store first due dates of %s: %w", fs.what, err)
		}
		res.Scheduled, res.Invalid = locked-nd.invalid, nd.invalid
		return nil
	})
	if err != nil || locked == 0 {
		return DueResult{}, 0, err
	}
	res.Batches = 1
	return res, locked, nil
}

// pendingRulesQuery locks scheduled top-up rules whose first due date is not computed yet.
const pendingRulesQuery = `
select id, cron_expr, time_zone, created_at
  from billing.topup_rules
 where status = 'schedule_pending' and id > $1
 order by id
 limit $2
   for update skip locked`

// lockedRow ends the output of the batch statements below: how many rows the batch locked, and
// the last (next_due_at, id) key among them, where the next batch starts.
const lockedRow = `
select 'locked', (select max(d.id) from due d where d.next_due_at = m.at), m.at, null, null, (select count(*) from due)
  from (select max(next_due_at) as at from due) m`

// dueRow is one output row of a batch statement: kind "charge" (id is a new charge), "next" (a
// cron plan or rule whose next date Go computes from at), "again" (n rows advanced to a date
// still due), or "locked" (n rows locked, the last key (at, id)).
type dueRow struct {
	kind       string
	id         pgtype.Int8
	at         pgtype.Timestamptz
	expr, zone pgtype.Text
	n          pgtype.Int8
}

func (r *dueRow) dest() []any { return []any{&r.kind, &r.id, &r.at, &r.expr, &r.zone, &r.n} }

// dueInstallmentsQuery charges one batch of due installments in one statement: it locks the
// plans due at $1 after the cursor ($2, $3), at most $4, skipping plans another run holds;
// inserts each plan's next installment as a charge (period = installment number, amount from the
// split, due_at = the installment's date); and advances each plan to its next installment, or
// completes it after the last. A monthly plan's next date is computed here; a cron plan's is
// computed in Go and stored by setPlanScheduleQuery in the same transaction.
const dueInstallmentsQuery = `
with due as (
    select p.id, p.customer_id, p.currency, p.description, p.total_amount, p.installment_count,
           p.remainder_installment, p.next_installment, p.next_due_at, p.schedule_kind,
           p.first_month, p.due_time, p.anchor_day, p.time_zone, p.cron_expr
      from billing.installment_plans p
     where p.status = 'active' and p.next_due_at <= $1
       and (p.next_due_at, p.id) > ($2::timestamptz, $3::bigint)
     order by p.next_due_at, p.id
     limit $4
       for update skip locked
),
charged as (
    insert into billing.charges (customer_id, source, source_id, period, amount, currency, description, due_at)
    select d.customer_id, 'installment', d.id, d.next_installment::text,
           billing.installment_amount(d.total_amount, d.installment_count, d.remainder_installment, d.next_installment),
           d.currency,
           d.description || ' (installment ' || d.next_installment || ' of ' || d.installment_count || ')',
           d.next_due_at
      from due d
        on conflict (source, source_id, period) do nothing
    returning id, source_id
),
advanced as (
    -- By primary key, not as a join with due: the planner would hash the whole table.
    update billing.installment_plans p
       set next_installment = p.next_installment + 1,
           status = case when p.next_installment >= p.installment_count then 'completed' else 'active' end,
           next_due_at = case
               when p.next_installment >= p.installment_count then null
               when p.schedule_kind = 'monthly'
                   then billing.monthly_due_on(p.first_month, p.due_time, p.time_zone, p.anchor_day, p.next_installment + 1)
               else p.next_due_at
           end,
           updated_at = now()
     where p.id = any (array(select d.id from due d))
    returning p.next_due_at
)
-- One row per new charge, one per cron plan whose next date Go computes, one with how many
-- monthly plans are still due after their advance, and one with the count and the last key of
-- the locked plans. No join: CTEs have no indexes, and a nested loop
-- over two batch-sized CTEs is quadratic.
select 'charge', c.id, null::timestamptz, null::text, null::text, null::bigint from charged c
union all
select 'next', d.id, d.next_due_at, d.cron_expr, d.time_zone, null
  from due d where d.schedule_kind = 'cron' and d.next_installment < d.installment_count
union all
select 'again', null, null, null, null, (select count(*) from advanced a where a.next_due_at <= $1)
union all` + lockedRow

// installmentsBatch charges one batch of due installments (dueInstallmentsQuery), stores the next
// due dates of its cron plans, and inserts the charge jobs, in one transaction.
func (d *Due) installmentsBatch(ctx context.Context, now time.Time, cur *dueCursor) (DueResult, int, error) {
	var charged []int64
	var locked, invalid int
	var statement, jobsTook time.Duration
	start := time.Now()
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		charged, locked, invalid = charged[:0], 0, 0
		rows, err := tx.Query(ctx, dueInstallmentsQuery, now, cur.at, cur.id, d.BatchSize)
		if err != nil {
			return fmt.Errorf("charge due installments: %w", err)
		}
		var (
			nd        nextDue
			r         dueRow
			schedules = scheduleCache{}
		)
		_, err = pgx.ForEachRow(rows, r.dest(), func() error {
			switch r.kind {
			case "charge":
				charged = append(charged, r.id.Int64)
			case "next":
				s, perr := schedules.get(r.expr.String, r.zone.String)
				var next time.Time
				if perr == nil {
					next = s.Next(r.at.Time)
				}
				nd.add(r.id.Int64, next, perr, "further ", d.Logger, "plan_id")
				if !next.IsZero() && !next.After(now) {
					cur.again = true
				}
			case "again":
				if r.n.Int64 > 0 {
					cur.again = true
				}
			case "locked":
				locked = int(r.n.Int64)
				if locked > 0 {
					cur.advance(r.at.Time, r.id.Int64)
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("charge due installments: %w", err)
		}
		if len(nd.ids) > 0 {
			if _, err := tx.Exec(ctx, setPlanScheduleQuery, nd.ids, nd.next, nd.reasons); err != nil {
				return fmt.Errorf("store next due dates: %w", err)
			}
		}
		invalid = nd.invalid
		statement = time.Since(start)
		err = d.insertChargeJobs(ctx, tx, charged)
		jobsTook = time.Since(start) - statement
		return err
	})
	if err != nil || locked == 0 {
		return DueResult{}, 0, err
	}
	d.Logger.Debug("due batch committed", "source", "installment", "locked", locked, "charges", len(charged),
		"statement", statement, "jobs", jobsTook, "commit", time.Since(start)-statement-jobsTook)
	metrics.DueCharges.WithLabelValues("installment").Add(float64(len(charged)))
	return DueResult{Installments: len(charged), Invalid: invalid, Batches: 1}, locked, nil
}

// dueScheduledTopupsQuery is dueInstallmentsQuery for scheduled top-up rules: each occurrence of
// the rule's schedule is charged once (period = the rule's firing sequence number), and the next
// occurrence is computed in Go.
const dueScheduledTopupsQuery = `
with due as (
    select r.id, r.customer_id, r.currency, r.description, r.fired_count, r.fixed_amount,
           r.next_due_at, r.cron_expr, r.time_zone
      from billing.topup_rules r
     where r.kind = 'scheduled' and r.status = 'active' and r.next_due_at <= $1
       and (r.next_due_at, r.id) > ($2::timestamptz, $3::bigint)
     order by r.next_due_at, r.id
     limit $4
       for update skip locked
),
charged as (
    insert into billing.charges (customer_id, source, source_id, period, amount, currency, description, due_at)
    select d.customer_id, 'topup', d.id, (d.fired_count + 1)::text, d.fixed_amount, d.currency, d.description, d.next_due_at
      from due d
        on conflict (source, source_id, period) do nothing
    returning id, source_id
),
fired as (
    update billing.topup_rules r
       set fired_count = r.fired_count + 1, last_fired_at = $1, updated_at = now()
     where r.id = any (array(select d.id from due d))
)
-- As in dueInstallmentsQuery: no join of two CTEs.
select 'charge', c.id, null::timestamptz, null::text, null::text, null::bigint from charged c
union all
select 'next', d.id, d.next_due_at, d.cron_expr, d.time_zone, null from due d
union all` + lockedRow

// scheduledTopupsBatch charges one batch of due scheduled top-ups and stores their next
// occurrences, in one transaction with their charge jobs.
func (d *Due) scheduledTopupsBatch(ctx context.Context, now time.Time, cur *dueCursor) (DueResult, int, error) {
	var charged []int64
	var locked, invalid int
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		charged, locked, invalid = charged[:0], 0, 0
		rows, err := tx.Query(ctx, dueScheduledTopupsQuery, now, cur.at, cur.id, d.BatchSize)
		if err != nil {
			return fmt.Errorf("charge scheduled top-ups: %w", err)
		}
		var (
			nd        nextDue
			r         dueRow
			schedules = scheduleCache{}
		)
		_, err = pgx.ForEachRow(rows, r.dest(), func() error {
			switch r.kind {
			case "charge":
				charged = append(charged, r.id.Int64)
			case "next":
				s, perr := schedules.get(r.expr.String, r.zone.String)
				var next time.Time
				if perr == nil {
					next = s.Next(r.at.Time)
				}
				nd.add(r.id.Int64, next, perr, "further ", d.Logger, "topup_rule_id")
				if !next.IsZero() && !next.After(now) {
					cur.again = true
				}
			case "locked":
				locked = int(r.n.Int64)
				if locked > 0 {
					cur.advance(r.at.Time, r.id.Int64)
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("charge scheduled top-ups: %w", err)
		}
		if locked == 0 {
			return nil
		}
		if _, err := tx.Exec(ctx, setRuleScheduleQuery, nd.ids, nd.next, nd.reasons); err != nil {
			return fmt.Errorf("store next due dates: %w", err)
		}
		invalid = nd.invalid
		return d.insertChargeJobs(ctx, tx, charged)
	})
	if err != nil || locked == 0 {
		return DueResult{}, 0, err
	}
	metrics.DueCharges.WithLabelValues("topup").Add(float64(len(charged)))
	return DueResult{Topups: len(charged), Invalid: invalid, Batches: 1}, locked, nil
}

// thresholdEligible is the firing condition of a threshold rule r at $1, with its customer's
// balance b: the balance is below the threshold, the cooldown since the last firing has passed,
// none of the rule's top-ups is open (not yet succeeded, recovered, uncollectible or canceled),
// and the cap per period is not reached. Shared by the two statements below.
const thresholdEligible = `
       r.kind = 'threshold' and r.status = 'active'
   and b.amount < r.threshold_amount
   and (r.last_fired_at is null or r.last_fired_at + r.cooldown <= $1::timestamptz)
   and not exists (select 1 from billing.charges c
                    where c.source = 'topup' and c.source_id = r.id
                      and c.status not in ('succeeded', 'recovered', 'uncollectible', 'canceled'))
   and (r.max_per_period is null
        or r.max_per_period > (select count(*) from billing.charges c
                                where c.source = 'topup' and c.source_id = r.id and c.due_at > $1::timestamptz - r.cap_period))`

// lockThresholdTopupsQuery locks a batch of threshold rules that look ready to fire at $1,
// after rule id $2, at most $3. The condition is checked again by fireThresholdTopupsQuery, in a
// statement whose snapshot is taken after the locks are held: a rule that another run fired
// meanwhile then has an open top-up and does not fire twice.
const lockThresholdTopupsQuery = `
select r.id
  from billing.topup_rules r
  join billing.balances b on b.customer_id = r.customer_id and b.currency = r.currency
 where r.id > $2 and` + thresholdEligible + `
 order by r.id
 limit $3
   for update of r skip locked`

// fireThresholdTopupsQuery fires the locked rules $2 that are still ready at $1: a charge of
// target - balance (or the fixed amount), period = the firing's sequence number, and the rule's
// count and last firing time advanced.
const fireThresholdTopupsQuery = `
with due as (
    select r.id, r.customer_id, r.currency, r.description, r.fired_count,
           coalesce(r.fixed_amount, r.target_amount - b.amount) as amount
      from billing.topup_rules r
      join billing.balances b on b.customer_id = r.customer_id and b.currency = r.currency
     where r.id = any($2::bigint[]) and` + thresholdEligible + `
),
charged as (
    insert into billing.charges (customer_id, source, source_id, period, amount, currency, description, due_at)
    select d.customer_id, 'topup', d.id, (d.fired_count + 1)::text, d.amount, d.currency, d.description, $1
      from due d
        on conflict (source, source_id, period) do nothing
    returning id
),
fired as (
    update billing.topup_rules r
       set fired_count = r.fired_count + 1, last_fired_at = $1, updated_at = now()
     where r.id = any (array(select d.id from due d))
)
select id from charged`

// thresholdTopupsBatch fires one batch of threshold top-up rules, in one transaction with their
// charge jobs. Rules are walked once per run by id: a rule that fired has an open top-up, so it
// cannot fire again in the same run.
func (d *Due) thresholdTopupsBatch(ctx context.Context, now time.Time, cur *dueCursor) (DueResult, int, error) {
	var charged []int64
	var locked int
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		charged, locked = charged[:0], 0
		rows, err := tx.Query(ctx, lockThresholdTopupsQuery, now, cur.id, d.BatchSize)
		if err != nil {
			return fmt.Errorf("lock threshold top-up rules: %w", err)
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return fmt.Errorf("lock threshold top-up rules: %w", err)
		}
		locked = len(ids)
		if locked == 0 {
			return nil
		}
		cur.id = ids[len(ids)-1]
		rows, err = tx.Query(ctx, fireThresholdTopupsQuery, now, ids)
		if err != nil {
			return fmt.Errorf("fire threshold top-ups: %w", err)
		}
		charged, err = pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return fmt.Errorf("fire threshold top-ups: %w", err)
		}
		return d.insertChargeJobs(ctx, tx, charged)
	})
	if err != nil || locked == 0 {
		return DueResult{}, 0, err
	}
	metrics.DueCharges.WithLabelValues("topup").Add(float64(len(charged)))
	return DueResult{Topups: len(charged), Batches: 1}, locked, nil
}
