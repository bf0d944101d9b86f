package jobs_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivertest"
	"github.com/riverqueue/river/rivertype"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/money"
	"github.com/billingd/billingd/jobs"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

type dueFixture struct {
	pool *pgxpool.Pool
	due  *jobs.Due
}

// setupDue returns a fresh database with a customer "alice" and a due computation on it.
func setupDue(t *testing.T) *dueFixture {
	t.Helper()
	pool := dbtest.NewPool(t)
	dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "alice"})
	return &dueFixture{pool: pool, due: &jobs.Due{
		Pool: pool, Logger: slog.New(slog.NewTextHandler(t.Output(), nil)), BatchSize: 50, Workers: 1,
	}}
}

func (f *dueFixture) run(t *testing.T, now time.Time) jobs.DueResult {
	t.Helper()
	res, err := f.due.Run(context.Background(), now)
	require.NoError(t, err)
	return res
}

func (f *dueFixture) id(t *testing.T, sql string, args ...any) int64 {
	t.Helper()
	var id int64
	require.NoError(t, f.pool.QueryRow(context.Background(), sql, args...).Scan(&id))
	return id
}

func (f *dueFixture) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	_, err := f.pool.Exec(context.Background(), sql, args...)
	require.NoError(t, err)
}

type charge struct {
	ID          int64
	Period      int
	Amount      int64
	Currency    string
	Description string
	DueAt       time.Time
	Status      string
}

// charges returns the charges of one plan or rule in period order.
func charges(t *testing.T, pool *pgxpool.Pool, source string, sourceID int64) []charge {
	t.Helper()
	rows, err := pool.Query(context.Background(), `select id, period::int, amount, currency, description, due_at, status
		from billing.charges where source = $1 and source_id = $2 order by period::int`, source, sourceID)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[charge])
	require.NoError(t, err)
	return out
}

// requireOneJobPerCharge checks that every charge has exactly one charge job on the charges
// queue and that every charge job names a charge.
func requireOneJobPerCharge(t *testing.T, pool *pgxpool.Pool) int {
	t.Helper()
	ctx := context.Background()
	var charges, jobs, orphans, wrong int
	require.NoError(t, pool.QueryRow(ctx, `select
		(select count(*) from billing.charges),
		(select count(*) from river_job where kind = 'charge'),
		(select count(*) from river_job j where kind = 'charge'
		  and not exists (select 1 from billing.charges c where c.id = (j.args->>'charge_id')::bigint)),
		(select count(*) from billing.charges c where (select count(*) from river_job j
		  where j.kind = 'charge' and j.queue = 'charges' and (j.args->>'charge_id')::bigint = c.id) <> 1)`).
		Scan(&charges, &jobs, &orphans, &wrong))
	require.Zero(t, orphans, "charge jobs naming no charge")
	require.Zero(t, wrong, "charges without exactly one charge job")
	require.Equal(t, charges, jobs)
	return charges
}

func settle(t *testing.T, pool *pgxpool.Pool, chargeID int64) {
	t.Helper()
	for _, s := range []string{"processing", "succeeded"} {
		_, err := pool.Exec(context.Background(), `update billing.charges set status = $2 where id = $1`, chargeID, s)
		require.NoError(t, err)
	}
}

func TestDueInstallmentsCatchUp(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := setupDue(t)
	paris := mustZone(t, "Europe/Paris")
	start := time.Date(2025, 1, 31, 10, 0, 0, 0, paris)
	plan := f.id(t, `select billing.create_installment_plan('alice', 'Sofa', 1000, 'usd', 6,
		anchor_day => 31, time_zone => 'Europe/Paris', starts_at => $1)`, start)
	amounts := money.Split(1000, 6, money.First)

	// Down since before the first installment: January, February and March are due.
	res := f.run(t, time.Date(2025, 4, 15, 0, 0, 0, 0, time.UTC))
	require.Equal(t, 3, res.Installments)
	require.Equal(t, 3, res.Batches, "a plan advances one period per batch")
	got := charges(t, f.pool, "installment", plan)
	require.Len(t, got, 3)
	for i, c := range got {
		require.Equal(t, i+1, c.Period)
		require.Equal(t, amounts[i], c.Amount)
		require.Equal(t, "usd", c.Currency)
		require.Equal(t, fmt.Sprintf("Sofa (installment %d of 6)", i+1), c.Description)
		require.True(t, jobs.MonthlyDue(start, paris, 31, i+1).Equal(c.DueAt), "installment %d due %s", i+1, c.DueAt)
		require.Equal(t, "pending", c.Status)
	}
	require.Equal(t, "2025-02-28", got[1].DueAt.In(paris).Format("2006-01-02"))

	// One charge job per charge, in order, on the charges queue.
	expected := make([]rivertest.ExpectedJob, len(got))
	for i := range expected {
		expected[i] = rivertest.ExpectedJob{Args: jobs.ChargeArgs{}, Opts: &rivertest.RequireInsertedOpts{
			Queue: jobs.QueueCharges, MaxAttempts: 25, State: rivertype.JobStateAvailable,
		}}
	}
	rows := rivertest.RequireManyInserted(ctx, t, riverpgxv5.New(f.pool), expected)
	for i, row := range rows {
		require.JSONEq(t, fmt.Sprintf(`{"charge_id": %d}`, got[i].ID), string(row.EncodedArgs))
	}

	var (
		next            *time.Time
		nextInstallment int
		status          string
	)
	planState := func() {
		require.NoError(t, f.pool.QueryRow(ctx, `select next_due_at, next_installment, status from billing.installment_plans where id = $1`, plan).
			Scan(&next, &nextInstallment, &status))
	}
	planState()
	require.Equal(t, 4, nextInstallment)
	require.Equal(t, "active", status)
	require.True(t, jobs.MonthlyDue(start, paris, 31, 4).Equal(*next))

	// The same moment again, or a second trigger: nothing more.
	require.Zero(t, f.run(t, time.Date(2025, 4, 15, 0, 0, 0, 0, time.UTC)).Installments)
	require.Len(t, charges(t, f.pool, "installment", plan), 3)

	// Months later: the rest, then the plan is complete.
	require.Equal(t, 3, f.run(t, time.Date(2025, 12, 1, 0, 0, 0, 0, time.UTC)).Installments)
	got = charges(t, f.pool, "installment", plan)
	require.Len(t, got, 6)
	var sum int64
	for i, c := range got {
		require.Equal(t, i+1, c.Period)
		sum += c.Amount
		if i > 0 {
			require.True(t, c.DueAt.After(got[i-1].DueAt))
		}
	}
	require.Equal(t, int64(1000), sum)
	planState()
	require.Equal(t, "completed", status)
	require.Equal(t, 7, nextInstallment)
	require.Nil(t, next)
	require.Zero(t, f.run(t, time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)).Installments)
	require.Equal(t, 6, requireOneJobPerCharge(t, f.pool))
}

func TestDueCronPlan(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := setupDue(t)
	plan := f.id(t, `select billing.create_installment_plan('alice', 'Phone', 1001, 'usd', 4,
		cron_expr => 'CRON_TZ=America/New_York 0 9 1 * *', starts_at => '2025-01-15', remainder_to => 'last')`)
	never := f.id(t, `select billing.create_installment_plan('alice', 'Never', 1000, 'usd', 4,
		cron_expr => '0 0 30 2 *', starts_at => '2025-01-15')`)

	res := f.run(t, utc("2025-03-05T00:00:00Z"))
	require.Equal(t, 1, res.Scheduled)
	require.Equal(t, 1, res.Invalid)
	require.Equal(t, 2, res.Installments)
	got := charges(t, f.pool, "installment", plan)
	require.Len(t, got, 2)
	require.Equal(t, utc("2025-02-01T14:00:00Z"), got[0].DueAt.UTC())
	require.Equal(t, utc("2025-03-01T14:00:00Z"), got[1].DueAt.UTC())
	require.Equal(t, []int64{250, 250}, []int64{got[0].Amount, got[1].Amount})

	var next time.Time
	var status string
	require.NoError(t, f.pool.QueryRow(ctx, `select next_due_at, status from billing.installment_plans where id = $1`, plan).Scan(&next, &status))
	require.Equal(t, "active", status)
	require.Equal(t, utc("2025-04-01T13:00:00Z"), next.UTC(), "09:00 New York in daylight time")

	// The plan whose expression never fires is marked, with the reason, and left alone.
	var reason string
	require.NoError(t, f.pool.QueryRow(ctx, `select status, status_reason from billing.installment_plans where id = $1`, never).Scan(&status, &reason))
	require.Equal(t, "invalid", status)
	require.Contains(t, reason, "no occurrence within five years")
	require.Empty(t, charges(t, f.pool, "installment", never))
	res = f.run(t, utc("2025-05-05T00:00:00Z"))
	require.Zero(t, res.Invalid, "an invalid plan is not looked at again")
	require.Equal(t, 2, res.Installments)

	got = charges(t, f.pool, "installment", plan)
	require.Len(t, got, 4)
	require.Equal(t, int64(251), got[3].Amount, "the last installment takes the remainder")
	require.NoError(t, f.pool.QueryRow(ctx, `select status from billing.installment_plans where id = $1`, plan).Scan(&status))
	require.Equal(t, "completed", status)
	require.Equal(t, 4, requireOneJobPerCharge(t, f.pool))
}

func TestDueLeavesInactivePlansAlone(t *testing.T) {
	t.Parallel()
	f := setupDue(t)
	canceled := f.id(t, `select billing.create_installment_plan('alice', 'Sofa', 1000, 'usd', 3, anchor_day => 1, starts_at => '2025-01-01')`)
	paused := f.id(t, `select billing.create_installment_plan('alice', 'Desk', 1000, 'usd', 3, anchor_day => 1, starts_at => '2025-01-01')`)
	active := f.id(t, `select billing.create_installment_plan('alice', 'Lamp', 1000, 'usd', 3, anchor_day => 1, starts_at => '2025-01-01')`)
	f.exec(t, `select billing.cancel_installment_plan($1, 'returned')`, canceled)
	f.exec(t, `update billing.installment_plans set status = 'paused' where id = $1`, paused)

	require.Equal(t, 3, f.run(t, utc("2025-06-01T00:00:00Z")).Installments)
	require.Empty(t, charges(t, f.pool, "installment", canceled))
	require.Empty(t, charges(t, f.pool, "installment", paused))
	require.Len(t, charges(t, f.pool, "installment", active), 3)
}

// TestDueBatchesAreBounded: many due rows go through in transactions of at most BatchSize rows.
func TestDueBatchesAreBounded(t *testing.T) {
	t.Parallel()
	f := setupDue(t)
	f.due.BatchSize = 4
	var plans []int64
	for i := range 25 {
		plans = append(plans, f.id(t, `select billing.create_installment_plan('alice', $1, 300, 'usd', 2, anchor_day => 1, starts_at => '2025-01-01')`,
			fmt.Sprintf("plan %d", i)))
	}
	res := f.run(t, utc("2025-03-01T00:00:00Z"))
	require.Equal(t, 50, res.Installments)
	require.GreaterOrEqual(t, res.Batches, 50/4)
	for _, p := range plans {
		got := charges(t, f.pool, "installment", p)
		require.Len(t, got, 2)
		require.Equal(t, []int{1, 2}, []int{got[0].Period, got[1].Period})
	}
	require.Equal(t, 50, requireOneJobPerCharge(t, f.pool))
}

// TestDueLogsProgress checks that a long run reports its progress while it works: the phase
// and what it has charged so far.
func TestDueLogsProgress(t *testing.T) {
	t.Parallel()
	f := setupDue(t)
	f.exec(t, `select billing.create_installment_plan('alice', 'Plan ' || i, 1200, 'usd', 12, anchor_day => 1, starts_at => '2025-01-01')
		from generate_series(1, 30) i`)
	var log bytes.Buffer
	due := &jobs.Due{Pool: f.pool, Logger: slog.New(slog.NewTextHandler(&log, nil)), BatchSize: 1, ProgressEvery: time.Millisecond}
	res, err := due.Run(context.Background(), utc("2025-01-15T00:00:00Z"))
	require.NoError(t, err)
	require.Equal(t, 30, res.Installments)
	require.Contains(t, log.String(), `msg="due computation in progress" phase=installments installments=`)
	require.Contains(t, log.String(), `msg="due computation finished" installments=30`)
}

// TestDueIsAtomicWithItsJobs injects a failure into the charge jobs' insert: the batch's charges
// and plan advances roll back with it, and the next run charges every period once.
func TestDueIsAtomicWithItsJobs(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := setupDue(t)
	plan := f.id(t, `select billing.create_installment_plan('alice', 'Sofa', 900, 'usd', 3, anchor_day => 1, starts_at => '2025-01-01')`)
	f.exec(t, `create function pg_temp_fail_charge_jobs() returns trigger language plpgsql as $$
		begin raise exception 'injected: river_job is unavailable'; end $$`)
	f.exec(t, `create trigger fail_charge_jobs before insert on river_job for each row
		when (new.kind = 'charge') execute function pg_temp_fail_charge_jobs()`)

	_, err := f.due.Run(ctx, utc("2025-06-01T00:00:00Z"))
	require.ErrorContains(t, err, "injected")
	require.Empty(t, charges(t, f.pool, "installment", plan))
	var nextInstallment int
	require.NoError(t, f.pool.QueryRow(ctx, `select next_installment from billing.installment_plans where id = $1`, plan).Scan(&nextInstallment))
	require.Equal(t, 1, nextInstallment)

	f.exec(t, `drop trigger fail_charge_jobs on river_job`)
	require.Equal(t, 3, f.run(t, utc("2025-06-01T00:00:00Z")).Installments)
	require.Len(t, charges(t, f.pool, "installment", plan), 3)
	require.Equal(t, 3, requireOneJobPerCharge(t, f.pool))
}

// chargeRecorder is a ChargeArgs worker that records the charges it is given, in place of the
// charge worker: it proves that the due computation's jobs are River's.
type chargeRecorder struct {
	river.WorkerDefaults[jobs.ChargeArgs]
	mu  sync.Mutex
	ids map[int64]int
}

func (w *chargeRecorder) Work(_ context.Context, job *river.Job[jobs.ChargeArgs]) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ids[job.Args.ChargeID]++
	return nil
}

// TestDueJobsRunAsRiverJobs checks the charge jobs that the due computation inserts in SQL
// against River: each is announced on River's insert channel, carries ChargeArgs' queue and
// attempt limit, and is fetched and worked by a River client once, with the charge it names.
func TestDueJobsRunAsRiverJobs(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := setupDue(t)
	f.exec(t, `select billing.create_installment_plan('alice', 'Sofa', 900, 'usd', 3, anchor_day => 1, starts_at => now())`)
	f.exec(t, `select billing.set_balance('alice', 'usd', 0)`)
	f.exec(t, `select billing.create_topup_rule('alice', 'Credit', 'usd', threshold_amount => 100, target_amount => 500)`)
	f.exec(t, `select billing.create_topup_rule('alice', 'Monthly', 'usd', fixed_amount => 700, cron_expr => '0 9 1 * *')`)

	// River's producers listen on this channel; the due computation must wake them.
	conn, err := f.pool.Acquire(ctx)
	require.NoError(t, err)
	defer func() {
		_, _ = conn.Exec(ctx, "unlisten *")
		conn.Release()
	}()
	var channel string
	require.NoError(t, conn.QueryRow(ctx, `select billing.river_insert_channel()`).Scan(&channel))
	_, err = conn.Exec(ctx, "listen "+pgx.Identifier{channel}.Sanitize())
	require.NoError(t, err)

	// Two months and more on: two or three installments, and a threshold top-up with two or
	// three scheduled ones.
	res := f.run(t, time.Now().AddDate(0, 2, 5))
	require.GreaterOrEqual(t, res.Installments, 2)
	require.GreaterOrEqual(t, res.Topups, 3)
	require.Equal(t, res.Installments+res.Topups, requireOneJobPerCharge(t, f.pool))

	waitCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	note, err := conn.Conn().WaitForNotification(waitCtx)
	require.NoError(t, err, "no notification on %s", channel)
	require.JSONEq(t, `{"queue":"`+jobs.QueueCharges+`"}`, note.Payload)

	opts := jobs.ChargeArgs{}.InsertOpts()
	var wrongOpts int
	require.NoError(t, f.pool.QueryRow(ctx, `select count(*) from river_job where kind = $1
		and (queue <> $2 or max_attempts <> $3 or state <> 'available' or priority <> 1)`,
		jobs.ChargeArgs{}.Kind(), opts.Queue, opts.MaxAttempts).Scan(&wrongOpts))
	require.Zero(t, wrongOpts, "charge jobs unlike ChargeArgs.InsertOpts")

	rec := &chargeRecorder{ids: map[int64]int{}}
	workers := river.NewWorkers()
	river.AddWorker(workers, rec)
	client, err := river.NewClient(riverpgxv5.New(f.pool), &river.Config{
		Logger:  quiet,
		Queues:  map[string]river.QueueConfig{jobs.QueueCharges: {MaxWorkers: 2}},
		Workers: workers,
	})
	require.NoError(t, err)
	require.NoError(t, client.Start(ctx))
	defer func() { require.NoError(t, client.Stop(context.Background())) }()
	var want []int64
	rows, err := f.pool.Query(ctx, `select id from billing.charges order by id`)
	require.NoError(t, err)
	want, err = pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.ids) == len(want)
	}, 20*time.Second, 20*time.Millisecond)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for _, id := range want {
		require.Equal(t, 1, rec.ids[id], "charge %d", id)
	}
}

func TestDueThresholdTopups(t *testing.T) {
	t.Parallel()
	f := setupDue(t)
	for _, ref := range []string{"bob", "carol", "dave", "erin"} {
		dbtest.NewCustomer(t, f.pool, dbtest.CustomerOpts{Ref: ref})
	}
	alice := f.id(t, `select billing.create_topup_rule('alice', 'Credit top-up', 'usd', threshold_amount => 500, target_amount => 2000,
		cooldown => '1 hour', max_per_period => 2, cap_period => '1 day')`)
	bob := f.id(t, `select billing.create_topup_rule('bob', 'Credit top-up', 'usd', threshold_amount => 500, fixed_amount => 1000)`)
	carol := f.id(t, `select billing.create_topup_rule('carol', 'Credit top-up', 'usd', threshold_amount => 500, fixed_amount => 1000)`)
	dave := f.id(t, `select billing.create_topup_rule('dave', 'Credit top-up', 'jpy', threshold_amount => 500, fixed_amount => 3000, cooldown => '0')`)
	erin := f.id(t, `select billing.create_topup_rule('erin', 'Credit top-up', 'usd', threshold_amount => 500, target_amount => 2000)`)
	f.exec(t, `select billing.set_balance('alice', 'usd', 300)`)
	f.exec(t, `select billing.set_balance('bob', 'usd', 800)`)  // above the threshold
	f.exec(t, `select billing.set_balance('carol', 'eur', 10)`) // low, but not in the rule's currency
	f.exec(t, `select billing.set_balance('dave', 'jpy', -100)`)
	f.exec(t, `select billing.set_balance('erin', 'usd', -900000)`) // owes 9,000.00: not charged off-session

	t0 := utc("2025-05-01T12:00:00Z")
	res := f.run(t, t0)
	require.Equal(t, 3, res.Topups)
	erins := charges(t, f.pool, "topup", erin)
	require.Len(t, erins, 1)
	require.Equal(t, int64(2000), erins[0].Amount, "a negative balance counts as zero: at most the target")
	got := charges(t, f.pool, "topup", alice)
	require.Len(t, got, 1)
	require.Equal(t, int64(1700), got[0].Amount, "target minus balance")
	require.Equal(t, 1, got[0].Period)
	require.Equal(t, t0, got[0].DueAt.UTC())
	require.Equal(t, "Credit top-up", got[0].Description)
	require.Empty(t, charges(t, f.pool, "topup", bob))
	require.Empty(t, charges(t, f.pool, "topup", carol))
	daves := charges(t, f.pool, "topup", dave)
	require.Len(t, daves, 1)
	require.Equal(t, int64(3000), daves[0].Amount)
	require.Equal(t, "jpy", daves[0].Currency)

	// An open top-up blocks the next one, even with no cooldown.
	require.Zero(t, f.run(t, t0.Add(2*time.Hour)).Topups)
	settle(t, f.pool, daves[0].ID)
	require.Equal(t, 1, f.run(t, t0.Add(2*time.Hour)).Topups, "dave's settled, cooldown 0: fires again")
	require.Len(t, charges(t, f.pool, "topup", dave), 2)

	// Settled, but the balance is not credited yet: the cooldown holds it back.
	settle(t, f.pool, got[0].ID)
	require.Zero(t, f.run(t, t0.Add(30*time.Minute)).Topups)
	require.Equal(t, 1, f.run(t, t0.Add(3*time.Hour)).Topups, "alice only: dave's second top-up is still open")
	got = charges(t, f.pool, "topup", alice)
	require.Len(t, got, 2)
	require.Equal(t, 2, got[1].Period)

	// Two in the last day: the cap holds the third back until the first leaves the window.
	settle(t, f.pool, got[1].ID)
	f.run(t, t0.Add(5*time.Hour))
	require.Len(t, charges(t, f.pool, "topup", alice), 2)
	f.run(t, t0.Add(25*time.Hour))
	got = charges(t, f.pool, "topup", alice)
	require.Len(t, got, 3)
	require.Equal(t, 3, got[2].Period)

	// The host credits the balance: nothing fires.
	settle(t, f.pool, got[2].ID)
	f.exec(t, `select billing.set_balance('alice', 'usd', 2000)`)
	f.run(t, t0.Add(48*time.Hour))
	require.Len(t, charges(t, f.pool, "topup", alice), 3)

	// A canceled rule fires no more.
	f.exec(t, `select billing.cancel_topup_rule($1, 'auto top-up off')`, dave)
	for _, c := range charges(t, f.pool, "topup", dave) {
		if c.Status == "pending" {
			settle(t, f.pool, c.ID)
		}
	}
	n := len(charges(t, f.pool, "topup", dave))
	f.run(t, t0.Add(72*time.Hour))
	require.Len(t, charges(t, f.pool, "topup", dave), n)
	requireOneJobPerCharge(t, f.pool)
}

func TestDueScheduledTopups(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := setupDue(t)
	rule := f.id(t, `select billing.create_topup_rule('alice', 'Weekly credit', 'eur', fixed_amount => 500,
		cron_expr => '0 9 * * mon', time_zone => 'Europe/Paris')`)
	var createdAt time.Time
	require.NoError(t, f.pool.QueryRow(ctx, `select created_at from billing.topup_rules where id = $1`, rule).Scan(&createdAt))

	// Three weeks of downtime after the rule was created: every Monday once, in order.
	now := createdAt.Add(3*7*24*time.Hour + time.Hour)
	res := f.run(t, now)
	require.Equal(t, 1, res.Scheduled)
	s, err := jobs.ParseSchedule("0 9 * * mon", "Europe/Paris")
	require.NoError(t, err)
	want := walk(s, createdAt.Add(-time.Nanosecond), now)
	require.GreaterOrEqual(t, len(want), 3)
	require.Equal(t, len(want), res.Topups)
	got := charges(t, f.pool, "topup", rule)
	require.Len(t, got, len(want))
	for i, c := range got {
		require.Equal(t, i+1, c.Period)
		require.Equal(t, int64(500), c.Amount)
		require.True(t, want[i].Equal(c.DueAt), "occurrence %d: want %s, got %s", i+1, want[i], c.DueAt)
		require.Equal(t, time.Monday, c.DueAt.In(s.Location()).Weekday())
	}
	require.Zero(t, f.run(t, now).Topups)
	var next time.Time
	var fired int
	require.NoError(t, f.pool.QueryRow(ctx, `select next_due_at, fired_count from billing.topup_rules where id = $1`, rule).Scan(&next, &fired))
	require.Equal(t, s.Next(want[len(want)-1]), next.In(s.Location()))
	require.Equal(t, len(want), fired)
	requireOneJobPerCharge(t, f.pool)
}

// TestDueConcurrentRunsChargeOnce runs the due computation from two replicas (two pools, two
// River clients) at once, many times, with small batches and a clock that moves on, while top-ups
// are settled in between: every installment and scheduled period is charged exactly once, no
// threshold rule ever has two open top-ups, and every charge has exactly one job.
func TestDueConcurrentRunsChargeOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dbURL := dbtest.NewDB(t)
	pools := []*pgxpool.Pool{dbtest.Pool(t, dbURL), dbtest.Pool(t, dbURL)}
	pool := pools[0]
	f := &dueFixture{pool: pool}
	base := time.Now().UTC().Truncate(time.Second)

	type planSpec struct {
		id     int64
		start  time.Time
		anchor int
		expr   string
		n      int
		total  int64
	}
	var plans []planSpec
	for i := range 30 {
		ref := "c" + strconv.Itoa(i)
		dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: ref})
		p := planSpec{start: base.Add(-time.Duration(i*7) * 24 * time.Hour), anchor: 1 + i%31, n: 12, total: int64(1000 + i)}
		p.id = f.id(t, `select billing.create_installment_plan($1, 'Plan', $2, 'usd', $3, anchor_day => $4, time_zone => 'Europe/Paris', starts_at => $5)`,
			ref, p.total, p.n, p.anchor, p.start)
		plans = append(plans, p)
		if i%3 == 0 {
			p := planSpec{start: base.Add(-time.Duration(i) * time.Hour), expr: "0 */6 * * *", n: 10, total: 999}
			p.id = f.id(t, `select billing.create_installment_plan($1, 'Cron plan', $2, 'usd', $3, cron_expr => $4, time_zone => 'America/New_York', starts_at => $5)`,
				ref, p.total, p.n, p.expr, p.start)
			plans = append(plans, p)
		}
	}
	// At most one open top-up per threshold rule at any moment: a trigger (test-only) refuses a
	// top-up while another of the same rule is open, so a double firing fails the run at once.
	// A second firing can only come after the first committed (the rule's row lock), so the
	// trigger's own snapshot sees it.
	f.exec(t, `create function test_one_open_topup() returns trigger language plpgsql as $$
		begin
			if (select kind from billing.topup_rules where id = new.source_id) = 'threshold'
			   and (select count(*) from billing.charges c where c.source = 'topup' and c.source_id = new.source_id
			        and c.status not in ('succeeded', 'recovered', 'uncollectible', 'canceled')) > 1 then
				raise exception 'rule % has two open top-ups', new.source_id;
			end if;
			return null;
		end $$`)
	f.exec(t, `create constraint trigger test_one_open_topup after insert on billing.charges
		for each row when (new.source = 'topup') execute function test_one_open_topup()`)
	var thresholdRules, scheduledRules []int64
	for i := range 12 {
		ref := "c" + strconv.Itoa(i)
		f.exec(t, `select billing.set_balance($1, 'usd', 0)`, ref)
		thresholdRules = append(thresholdRules, f.id(t, `select billing.create_topup_rule($1, 'Credit', 'usd', threshold_amount => 100, target_amount => 500, cooldown => '0')`, ref))
		if i%3 == 0 {
			scheduledRules = append(scheduledRules, f.id(t, `select billing.create_topup_rule($1, 'Every 8h', 'usd', fixed_amount => 200, cron_expr => '0 */8 * * *')`, ref))
		}
	}

	const steps = 12
	step := 36 * time.Hour
	end := base.Add(steps * step)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for r, p := range pools {
		due := &jobs.Due{Pool: p, Logger: quiet, BatchSize: 7, Workers: 2}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i <= steps; i++ {
				for range 2 { // two triggers per moment, as when a tick and a retry meet
					if _, err := due.Run(ctx, base.Add(time.Duration(i)*step)); err != nil {
						errs <- fmt.Errorf("replica %d step %d: %w", r, i, err)
						return
					}
				}
			}
		}()
	}
	// Meanwhile the "charge job" settles open top-ups, so threshold rules fire again.
	stop := make(chan struct{})
	settled := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				settled <- n
				return
			case <-time.After(20 * time.Millisecond):
			}
			tag, err := pool.Exec(ctx, `update billing.charges set status = 'processing' where source = 'topup' and status = 'pending'`)
			if err == nil {
				_, err = pool.Exec(ctx, `update billing.charges set status = 'succeeded' where source = 'topup' and status = 'processing'`)
			}
			if err != nil {
				errs <- err
			}
			n += int(tag.RowsAffected())
		}
	}()
	wg.Wait()
	close(stop)
	require.Positive(t, <-settled)
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	// A last run at the end, after everything settled, from one replica.
	_, err := (&jobs.Due{Pool: pool, Logger: quiet, BatchSize: 7}).Run(ctx, end)
	require.NoError(t, err)

	paris, newYork := mustZone(t, "Europe/Paris"), mustZone(t, "America/New_York")
	for _, p := range plans {
		var want []time.Time
		if p.expr == "" {
			for k := 1; k <= p.n; k++ {
				if at := jobs.MonthlyDue(p.start, paris, p.anchor, k); !at.After(end) {
					want = append(want, at)
				}
			}
		} else {
			s, err := jobs.ParseSchedule(p.expr, newYork.String())
			require.NoError(t, err)
			for at := s.First(p.start); !at.IsZero() && !at.After(end) && len(want) < p.n; at = s.Next(at) {
				want = append(want, at)
			}
		}
		got := charges(t, pool, "installment", p.id)
		require.Len(t, got, len(want), "plan %d", p.id)
		for k, c := range got {
			require.Equal(t, k+1, c.Period, "plan %d", p.id)
			require.True(t, want[k].Equal(c.DueAt), "plan %d installment %d: want %s got %s", p.id, k+1, want[k], c.DueAt)
		}
	}
	for _, r := range scheduledRules {
		var createdAt time.Time
		require.NoError(t, pool.QueryRow(ctx, `select created_at from billing.topup_rules where id = $1`, r).Scan(&createdAt))
		s, err := jobs.ParseSchedule("0 */8 * * *", "UTC")
		require.NoError(t, err)
		want := walk(s, createdAt.Add(-time.Nanosecond), end)
		got := charges(t, pool, "topup", r)
		require.Len(t, got, len(want), "rule %d", r)
		for k, c := range got {
			require.Equal(t, k+1, c.Period)
			require.True(t, want[k].Equal(c.DueAt), "rule %d occurrence %d", r, k+1)
		}
	}
	for _, r := range thresholdRules {
		got := charges(t, pool, "topup", r)
		require.NotEmpty(t, got, "rule %d", r)
		open := 0
		for k, c := range got {
			require.Equal(t, k+1, c.Period)
			require.Equal(t, int64(500), c.Amount)
			if c.Status == "pending" {
				open++
			}
		}
		require.LessOrEqual(t, open, 1, "rule %d has two open top-ups", r)
	}
	var fired, topupCharges int
	require.NoError(t, pool.QueryRow(ctx, `select (select coalesce(sum(fired_count), 0) from billing.topup_rules),
		(select count(*) from billing.charges where source = 'topup')`).Scan(&fired, &topupCharges))
	require.Equal(t, fired, topupCharges)
	requireOneJobPerCharge(t, pool)
}

// TestDueTwoReplicasPeriodic runs two River clients, as two replicas of the daemon, with the due
// job registered as in production (jobs.Register, jobs.PeriodicJobs) on a one-second cadence, for
// a few seconds while installments fall due: each is charged once.
func TestDueTwoReplicasPeriodic(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dbURL := dbtest.NewDB(t)
	pool := dbtest.Pool(t, dbURL)
	f := &dueFixture{pool: pool}
	dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "alice"})

	now := time.Now().UTC()
	type planSpec struct {
		id    int64
		start time.Time
		n     int
	}
	var plans []planSpec
	for i := range 20 {
		// Starting over the next few seconds, on their own day of the month: their first
		// installment falls due while the replicas run. Every fourth started months ago.
		start := now.Add(time.Duration(500+i*150) * time.Millisecond)
		n := 1
		if i%4 == 0 {
			start = now.AddDate(0, -3, 0)
			n = 4 // three months behind, plus one due now
		}
		p := planSpec{start: start, n: n}
		p.id = f.id(t, `select billing.create_installment_plan('alice', 'Plan', 1200, 'usd', 12, anchor_day => $1, starts_at => $2)`,
			start.Day(), start)
		plans = append(plans, p)
	}

	cfg := &config.Config{}
	require.NoError(t, config.NewFlagSet("run", cfg, func(string) string { return "" }).Parse(nil)) // the defaults
	cfg.DueSchedule, cfg.DueBatchSize = "@every 1s", 3
	for range 2 {
		p := dbtest.Pool(t, dbURL)
		deps := &jobs.Deps{Pool: p, Logger: quiet, Config: cfg}
		workers := river.NewWorkers()
		require.NoError(t, jobs.Register(workers, deps))
		periodic, err := jobs.PeriodicJobs(deps)
		require.NoError(t, err)
		client, err := river.NewClient(riverpgxv5.New(p), &river.Config{
			Logger:        quiet,
			Queues:        map[string]river.QueueConfig{jobs.QueueDefault: {MaxWorkers: 2}}, // charge jobs stay queued
			Workers:       workers,
			PeriodicJobs:  periodic,
			FetchCooldown: 20 * time.Millisecond,
		})
		require.NoError(t, err)
		require.NoError(t, client.Start(ctx))
		t.Cleanup(func() {
			stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			require.NoError(t, client.Stop(stopCtx))
		})
	}

	last := plans[len(plans)-1].start
	deadline := time.Now().Add(30 * time.Second)
	want := 0
	for _, p := range plans {
		want += p.n
	}
	for {
		var n int
		require.NoError(t, pool.QueryRow(ctx, `select count(*) from billing.charges`).Scan(&n))
		if n >= want && time.Now().After(last.Add(1500*time.Millisecond)) {
			break
		}
		require.True(t, time.Now().Before(deadline), "only %d of %d installments charged", n, want)
		time.Sleep(100 * time.Millisecond)
	}
	for _, p := range plans {
		got := charges(t, pool, "installment", p.id)
		require.Len(t, got, p.n, "plan %d", p.id)
		for k, c := range got {
			require.Equal(t, k+1, c.Period)
		}
	}
	requireOneJobPerCharge(t, pool)
	// The periodic job keeps ticking (on a loaded machine a tick may come late: wait for it).
	require.Eventually(t, func() bool {
		var runs int
		require.NoError(t, pool.QueryRow(ctx, `select count(*) from river_job where kind = 'due' and state = 'completed'`).Scan(&runs))
		return runs >= 2
	}, 20*time.Second, 100*time.Millisecond, "the periodic job ran on several ticks")
	// Later ticks found nothing more to charge.
	for _, p := range plans {
		require.Len(t, charges(t, pool, "installment", p.id), p.n, "plan %d after more ticks", p.id)
	}
	requireOneJobPerCharge(t, pool)
}

// TestDuePauseAndResume pauses plans and resumes them both ways: by default the remaining
// installments continue from now on (a monthly plan moves by whole months, a cron plan takes its
// next occurrence), and nothing missed while paused is charged; with catch_up the missed ones are
// charged at once, each once.
func TestDuePauseAndResume(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := setupDue(t)
	now := time.Now()
	monthly := f.id(t, `select billing.create_installment_plan('alice', 'Sofa', 1200, 'usd', 12, anchor_day => 1,
		starts_at => now() - interval '75 days')`)
	catchUp := f.id(t, `select billing.create_installment_plan('alice', 'Bike', 1200, 'usd', 12, anchor_day => 1,
		starts_at => now() - interval '75 days')`)
	cronPlan := f.id(t, `select billing.create_installment_plan('alice', 'Lessons', 1000, 'usd', 10, cron_expr => '0 9 * * *',
		starts_at => now() - interval '3 days')`)
	f.run(t, now)
	before := map[int64]int{}
	for _, p := range []int64{monthly, catchUp, cronPlan} {
		before[p] = len(charges(t, f.pool, "installment", p))
		require.GreaterOrEqual(t, before[p], 2, "plan %d charged what fell due", p)
	}

	var paused bool
	for _, p := range []int64{monthly, catchUp, cronPlan} {
		require.NoError(t, f.pool.QueryRow(ctx, `select billing.pause_installment_plan($1, 'customer asked for a break')`, p).Scan(&paused))
		require.True(t, paused)
	}
	require.NoError(t, f.pool.QueryRow(ctx, `select billing.pause_installment_plan($1, 'again')`, monthly).Scan(&paused))
	require.False(t, paused, "already paused")
	require.Zero(t, f.run(t, now.AddDate(0, 2, 0)).Installments, "paused plans are skipped")

	// Resumed from now on: the next installment on the first anchor date ahead, none skipped.
	var next time.Time
	require.NoError(t, f.pool.QueryRow(ctx, `select billing.resume_installment_plan($1, 'back from the break')`, monthly).Scan(&next))
	require.False(t, next.Before(now), "not in the past")
	require.True(t, next.Before(now.AddDate(0, 1, 1)), "within a month")
	require.Equal(t, 1, next.UTC().Day(), "on the anchor day")
	require.Zero(t, f.run(t, now).Installments, "nothing missed is charged")
	require.Equal(t, 1, f.run(t, next).Installments)
	got := charges(t, f.pool, "installment", monthly)
	require.Len(t, got, before[monthly]+1)
	require.Equal(t, before[monthly]+1, got[len(got)-1].Period, "the next installment, not a skipped one")
	require.True(t, next.Equal(got[len(got)-1].DueAt))

	// A cron plan takes the first occurrence ahead, computed by the due run.
	var cronNext *time.Time
	require.NoError(t, f.pool.QueryRow(ctx, `select billing.resume_installment_plan($1, 'back')`, cronPlan).Scan(&cronNext))
	require.Nil(t, cronNext)
	res := f.run(t, now)
	require.Equal(t, 1, res.Scheduled)
	require.NoError(t, f.pool.QueryRow(ctx, `select next_due_at from billing.installment_plans where id = $1`, cronPlan).Scan(&next))
	require.True(t, next.After(now.Add(-time.Minute)) && next.Before(now.Add(25*time.Hour)), "next 09:00: %s", next)
	require.Len(t, charges(t, f.pool, "installment", cronPlan), before[cronPlan])

	// With catch_up, the installments that fell due while paused are charged, each once.
	require.NoError(t, f.pool.QueryRow(ctx, `select billing.resume_installment_plan($1, 'paid the arrears', catch_up => true)`, catchUp).Scan(&next))
	require.True(t, next.Before(now.AddDate(0, 1, 0)))
	later := now.AddDate(0, 2, 0)
	f.run(t, later)
	got = charges(t, f.pool, "installment", catchUp)
	require.Greater(t, len(got), before[catchUp]+1, "the missed installments at once")
	for i, c := range got {
		require.Equal(t, i+1, c.Period)
	}
	require.Zero(t, f.run(t, later).Installments)

	// Bad calls change nothing.
	for _, tc := range []struct{ sql, code string }{
		{`select billing.resume_installment_plan(` + strconv.FormatInt(monthly, 10) + `, 'x')`, "55000"}, // active, not paused
		{`select billing.resume_installment_plan(999999, 'x')`, "P0002"},
		{`select billing.resume_installment_plan(` + strconv.FormatInt(monthly, 10) + `, ' ')`, "22023"},
		{`select billing.pause_installment_plan(999999, 'x')`, "P0002"},
	} {
		_, err := f.pool.Exec(ctx, tc.sql)
		var pgErr *pgconn.PgError
		require.ErrorAs(t, err, &pgErr, tc.sql)
		require.Equal(t, tc.code, pgErr.Code, tc.sql)
	}
	f.exec(t, `select billing.cancel_installment_plan($1, 'returned')`, monthly)
	_, err := f.pool.Exec(ctx, `select billing.pause_installment_plan($1, 'x')`, monthly)
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "55000", pgErr.Code, "a canceled plan is not paused")
}
