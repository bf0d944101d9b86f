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
	return river.InsertOpts{Queue: QueueDefault, MaxAttempts: 3, UniqueOpts: oneAtATime}
}

// dueWorkers is how many batch transactions a due run keeps in flight, each on its own connection:
// a batch is mostly one statement, so two keep two database cores busy (measured in
// BENCHMARKS.md; a third added contention, not speed, on two cores).
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
// balance is low. It works in batches of at most BatchSize rows, each one transaction and, for
// installments, one statement: lock the due rows (FOR UPDATE SKIP LOCKED, so concurrent runs share
// the work and never wait on each other), insert their charges (unique per source and period: a
// second run inserts nothing), insert a River charge job per charge (chargeJobsCTE), and advance
// the plans and rules. Rows stay in PostgreSQL: Go reads one summary row per batch, plus the cron
// plans whose next date it computes, so memory is flat however many rows are due, and Workers
// batches in flight keep every core of the database busy.
type Due struct {
	Pool      *pgxpool.Pool
	Logger    *slog.Logger
	BatchSize int // rows per transaction; at least 1
	Workers   int // batch transactions in flight at once; 0 means 1
	// ProgressEvery is how often a long run logs its progress; 0 means every 10 seconds.
	ProgressEvery time.Duration
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
	progress := &dueProgress{}
	defer d.logProgress(progress, start)()
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
		progress.phase(p.name)
		res, err := d.drain(ctx, now, p.batch, p.multi, progress)
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

// dueProgress is what a run has done so far, for its progress lines.
type dueProgress struct {
	mu      sync.Mutex
	current string
	done    DueResult
}

func (p *dueProgress) phase(name string) {
	p.mu.Lock()
	p.current = name
	p.mu.Unlock()
}

func (p *dueProgress) add(r DueResult) {
	p.mu.Lock()
	p.done.add(r)
	p.mu.Unlock()
}

// logProgress logs what the run has done every ProgressEvery until the returned function is
// called, so that an operator watching a long catch-up sees it advance.
func (d *Due) logProgress(p *dueProgress, start time.Time) (stop func()) {
	every := d.ProgressEvery
	if every <= 0 {
		every = 10 * time.Second
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				p.mu.Lock()
				phase, r := p.current, p.done
				p.mu.Unlock()
				elapsed := time.Since(start)
				d.Logger.Info("due computation in progress", "phase", phase,
					"installments", r.Installments, "topups", r.Topups, "batches", r.Batches,
					"charges_per_second", int(float64(r.Installments+r.Topups)/elapsed.Seconds()),
					"elapsed", elapsed.Round(time.Second))
			}
		}
	}()
	return func() { close(done); wg.Wait() }
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
func (d *Due) drain(ctx context.Context, now time.Time, batch func(context.Context, time.Time, *dueCursor) (DueResult, int, error), multi bool, progress *dueProgress) (DueResult, error) {
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
				progress.add(res)
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

// chargeJobsCTE is the CTE that inserts a River charge job for every row of the CTE "charged"
// (its column id, a new charge), in the statement that inserts the charges: River's row as
// ChargeArgs and its InsertOpts describe it, with River's defaults for the rest (state available,
// scheduled now, priority 1), as billing.enqueue_charge inserts finance's. Set-based in the
// database, it spares the batch a round trip and the encoding of every job in Go; a test runs
// the jobs it inserts with River (TestDueJobsRunAsRiverJobs).
var chargeJobsCTE = func() string {
	opts := ChargeArgs{}.InsertOpts()
	return fmt.Sprintf(`
jobs as (
    insert into river_job (args, kind, queue, max_attempts)
    select jsonb_build_object('charge_id', c.id), '%s', '%s', %d from charged c
)`, ChargeArgs{}.Kind(), opts.Queue, opts.MaxAttempts)
}()

// notifyChargeJobs tells the River producers of every replica that charge jobs are available,
// once per batch, as River's own inserts do; it is delivered at commit.
var notifyChargeJobs = fmt.Sprintf(`select pg_notify(billing.river_insert_channel(), '{"queue":"%s"}')`,
	ChargeArgs{}.InsertOpts().Queue)

func notifyJobs(ctx context.Context, tx pgx.Tx, charged int) error {
	if charged == 0 {
		return nil
	}
	if _, err := tx.Exec(ctx, notifyChargeJobs); err != nil {
		return fmt.Errorf("notify the charge jobs: %w", err)
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

// setPlanScheduleQuery stores the Go-computed due dates $2 of cron plans $1: when $4 is null, the
// first date of a pending plan, which becomes active; when $4 is the time of the run that has just
// charged them, the date of their next installment, to which they advance. A null date marks the
// plan invalid with the reason $3 (a charge already made stands).
const setPlanScheduleQuery = `
update billing.installment_plans p
   set next_installment = p.next_installment + case when $4::timestamptz is null then 0 else 1 end,
       next_due_at      = u.next_due_at,
       status           = case when u.next_due_at is null then 'invalid'
                               when p.status = 'schedule_pending' then 'active' else p.status end,
       status_reason    = coalesce(u.reason, p.status_reason),
       updated_at       = now()
  from unnest($1::bigint[], $2::timestamptz[], $3::text[]) as u (id, next_due_at, reason)
 where p.id = u.id`

// setRuleScheduleQuery is setPlanScheduleQuery for scheduled top-up rules: a non-null $4 records
// that they fired then.
const setRuleScheduleQuery = `
update billing.topup_rules r
   set fired_count   = r.fired_count + case when $4::timestamptz is null then 0 else 1 end,
       last_fired_at = coalesce($4, r.last_fired_at),
       next_due_at   = u.next_due_at,
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
		if _, err := tx.Exec(ctx, fs.store, nd.ids, nd.next, nd.reasons, nil); err != nil {
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

// chargedRow starts the output of the batch statements below: how many charges (and charge jobs)
// the batch inserted.
const chargedRow = `
select 'charged', null::bigint, null::timestamptz, null::text, null::text, (select count(*) from charged)`

// dueRow is one output row of a batch statement: kind "charged" (n charges and jobs inserted),
// "next" (a cron plan or rule whose next date Go computes from at), "again" (n rows advanced to a
// date still due), or "locked" (n rows locked, the last key (at, id)).
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
// split, due_at = the installment's date) and its charge job; and advances each plan to its next
// installment, or completes it after the last. A monthly plan's next date is computed here; a
// cron plan's is computed in Go and stored with its advance by setPlanScheduleQuery, in the same
// transaction.
var dueInstallmentsQuery = `
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
    returning id
),` + chargeJobsCTE + `,
advanced as (
    -- Monthly plans, and plans at their last installment; a cron plan with installments to come
    -- is advanced by setPlanScheduleQuery, with its next date, in one update rather than two.
    -- By primary key, not as a join with due: the planner would hash the whole table.
    update billing.installment_plans p
       set next_installment = p.next_installment + 1,
           status = case when p.next_installment >= p.installment_count then 'completed' else 'active' end,
           next_due_at = case
               when p.next_installment >= p.installment_count then null
               else billing.monthly_due_on(p.first_month, p.due_time, p.time_zone, p.anchor_day, p.next_installment + 1)
           end,
           updated_at = now()
     where p.id = any (array(select d.id from due d
                              where d.schedule_kind = 'monthly' or d.next_installment >= d.installment_count))
    returning p.next_due_at
)
-- One row with the count of new charges, one per cron plan whose next date Go computes, one with
-- how many monthly plans are still due after their advance, and one with the count and the last
-- key of the locked plans. No join: CTEs have no indexes, and a nested loop over two batch-sized
-- CTEs is quadratic.` + chargedRow + `
union all
select 'next', d.id, d.next_due_at, d.cron_expr, d.time_zone, null
  from due d where d.schedule_kind = 'cron' and d.next_installment < d.installment_count
union all
select 'again', null, null, null, null, (select count(*) from advanced a where a.next_due_at <= $1)
union all` + lockedRow

// installmentsBatch charges one batch of due installments with their charge jobs
// (dueInstallmentsQuery) and stores the next due dates of its cron plans, in one transaction.
func (d *Due) installmentsBatch(ctx context.Context, now time.Time, cur *dueCursor) (DueResult, int, error) {
	res, locked, err := d.chargeBatch(ctx, now, cur, dueInstallmentsQuery, setPlanScheduleQuery, "plan_id")
	if err != nil {
		return DueResult{}, 0, fmt.Errorf("charge due installments: %w", err)
	}
	metrics.DueCharges.WithLabelValues("installment").Add(float64(res.charged))
	return DueResult{Installments: res.charged, Invalid: res.invalid, Batches: min(locked, 1)}, locked, nil
}

// batchOutcome is what one batch statement of installments or scheduled top-ups did.
type batchOutcome struct{ charged, invalid int }

// chargeBatch runs one batch statement (dueInstallmentsQuery or dueScheduledTopupsQuery) at now
// from cur, computes in Go the next due dates of the cron schedules it names and advances those
// rows to them with store (setPlanScheduleQuery or setRuleScheduleQuery), and notifies River of
// the new charge jobs, in one transaction. It advances cur and reports how many rows the batch
// locked.
func (d *Due) chargeBatch(ctx context.Context, now time.Time, cur *dueCursor, query, store, idLogKey string) (batchOutcome, int, error) {
	var (
		out    batchOutcome
		locked int
		next   dueCursor
	)
	start := time.Now()
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		out, locked, next = batchOutcome{}, 0, *cur
		rows, err := tx.Query(ctx, query, now, cur.at, cur.id, d.BatchSize)
		if err != nil {
			return err
		}
		var (
			nd        nextDue
			r         dueRow
			schedules = scheduleCache{}
		)
		_, err = pgx.ForEachRow(rows, r.dest(), func() error {
			switch r.kind {
			case "charged":
				out.charged = int(r.n.Int64)
			case "next":
				s, perr := schedules.get(r.expr.String, r.zone.String)
				var at time.Time
				if perr == nil {
					at = s.Next(r.at.Time)
				}
				nd.add(r.id.Int64, at, perr, "further ", d.Logger, idLogKey)
				if !at.IsZero() && !at.After(now) {
					next.again = true
				}
			case "again":
				if r.n.Int64 > 0 {
					next.again = true
				}
			case "locked":
				locked = int(r.n.Int64)
				if locked > 0 {
					next.advance(r.at.Time, r.id.Int64)
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if len(nd.ids) > 0 {
			if _, err := tx.Exec(ctx, store, nd.ids, nd.next, nd.reasons, now); err != nil {
				return fmt.Errorf("store next due dates: %w", err)
			}
		}
		out.invalid = nd.invalid
		return notifyJobs(ctx, tx, out.charged)
	})
	if err != nil {
		return batchOutcome{}, 0, err
	}
	*cur = next
	if locked > 0 {
		d.Logger.Debug("due batch committed", "locked", locked, "charges", out.charged, "took", time.Since(start))
	}
	return out, locked, nil
}

// dueScheduledTopupsQuery is dueInstallmentsQuery for scheduled top-up rules: each occurrence of
// the rule's schedule is charged once (period = the rule's firing sequence number), and the next
// occurrence is computed in Go and stored by setRuleScheduleQuery.
var dueScheduledTopupsQuery = `
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
    returning id
),` + chargeJobsCTE + `
-- As in dueInstallmentsQuery: no join of two CTEs. The rules are advanced by
-- setRuleScheduleQuery, with their next occurrences.` + chargedRow + `
union all
select 'next', d.id, d.next_due_at, d.cron_expr, d.time_zone, null from due d
union all` + lockedRow

// scheduledTopupsBatch charges one batch of due scheduled top-ups with their charge jobs and
// stores their next occurrences, in one transaction.
func (d *Due) scheduledTopupsBatch(ctx context.Context, now time.Time, cur *dueCursor) (DueResult, int, error) {
	res, locked, err := d.chargeBatch(ctx, now, cur, dueScheduledTopupsQuery, setRuleScheduleQuery, "topup_rule_id")
	if err != nil {
		return DueResult{}, 0, fmt.Errorf("charge scheduled top-ups: %w", err)
	}
	metrics.DueCharges.WithLabelValues("topup").Add(float64(res.charged))
	return DueResult{Topups: res.charged, Invalid: res.invalid, Batches: min(locked, 1)}, locked, nil
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
// target - balance, at most target (or the fixed amount), period = the firing's sequence number, with its charge
// job, and the rule's count and last firing time advanced. It returns how many charges it made.
var fireThresholdTopupsQuery = `
with due as (
    select r.id, r.customer_id, r.currency, r.description, r.fired_count,
           -- A negative balance counts as zero: a top-up never exceeds target_amount, however
           -- much the host application's balance says the customer owes.
           coalesce(r.fixed_amount, r.target_amount - greatest(b.amount, 0)) as amount
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
),` + chargeJobsCTE + `,
fired as (
    update billing.topup_rules r
       set fired_count = r.fired_count + 1, last_fired_at = $1, updated_at = now()
     where r.id = any (array(select d.id from due d))
)
select count(*) from charged`

// thresholdTopupsBatch fires one batch of threshold top-up rules, in one transaction with their
// charge jobs. Rules are walked once per run by id: a rule that fired has an open top-up, so it
// cannot fire again in the same run.
func (d *Due) thresholdTopupsBatch(ctx context.Context, now time.Time, cur *dueCursor) (DueResult, int, error) {
	var charged, locked int
	var last int64
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		charged, locked = 0, 0
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
		last = ids[len(ids)-1]
		if err := tx.QueryRow(ctx, fireThresholdTopupsQuery, now, ids).Scan(&charged); err != nil {
			return fmt.Errorf("fire threshold top-ups: %w", err)
		}
		return notifyJobs(ctx, tx, charged)
	})
	if err != nil || locked == 0 {
		return DueResult{}, 0, err
	}
	cur.id = last
	metrics.DueCharges.WithLabelValues("topup").Add(float64(charged))
	return DueResult{Topups: charged, Batches: 1}, locked, nil
}
