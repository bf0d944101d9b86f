package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	"github.com/billingd/billingd/jobs"
)

// DueOptions size the due-computation measurement.
type DueOptions struct {
	Plans   int    // active installment plans, all due (one installment each)
	Batch   int    // rows per transaction (BILLING_DUE_BATCH_SIZE)
	Workers int    // batch transactions in flight
	Kind    string // schedule of the seeded plans: monthly (next date in SQL) or cron (next date in Go)
}

// DueResult is one due-computation measurement.
type DueResult struct {
	Options DueOptions
	// Elapsed is the due computation; Baseline the mean of the two baseline runs around it.
	Elapsed, Baseline time.Duration
	// TimeRatio and CPURatio compare the due computation with the mean baseline.
	TimeRatio, CPURatio float64
	// Heap is the due computation's peak Go heap in use; RSS the process's peak RSS.
	Heap, RSS uint64
}

// heapPeak samples the Go heap in use until stopped and returns its peak.
func heapPeak() (stop func() uint64) {
	var (
		peak uint64
		mu   sync.Mutex
		done = make(chan struct{})
		wg   sync.WaitGroup
	)
	sample := func() {
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		mu.Lock()
		peak = max(peak, m.HeapInuse)
		mu.Unlock()
	}
	runtime.GC()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			sample()
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return func() uint64 {
		close(done)
		wg.Wait()
		sample()
		return peak
	}
}

func maxRSS() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return -1
	}
	return ru.Maxrss * 1024 // kilobytes on Linux
}

const mib = 1 << 20

// processCPU returns the CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// clusterCPU returns the CPU time used so far by the PostgreSQL server that pool talks to, when
// it runs on this machine: its postmaster and every process it started (those still running,
// and those it has reaped). It is meaningful on a server of the benchmark's own (dbtest starts
// one when TEST_DATABASE_URL is unset); a shared server's figure includes everyone's work.
func clusterCPU(ctx context.Context, pool *pgxpool.Pool) (time.Duration, bool) {
	var backend int
	if err := pool.QueryRow(ctx, "select pg_backend_pid()").Scan(&backend); err != nil {
		return 0, false
	}
	stat := func(pid int) (ppid int, ticks [4]int64, ok bool) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return 0, ticks, false
		}
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:])) // fields from 3 (state) on
		if len(f) < 15 {
			return 0, ticks, false
		}
		ppid, _ = strconv.Atoi(f[1])
		for i := range ticks {
			ticks[i], _ = strconv.ParseInt(f[11+i], 10, 64) // utime, stime, cutime, cstime
		}
		return ppid, ticks, true
	}
	postmaster, _, ok := stat(backend)
	if !ok {
		return 0, false
	}
	_, pm, ok := stat(postmaster)
	if !ok {
		return 0, false
	}
	total := pm[0] + pm[1] + pm[2] + pm[3]
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid, t, ok := stat(pid); ok && ppid == postmaster {
			total += t[0] + t[1]
		}
	}
	const ticksPerSecond = 100 // USER_HZ on Linux
	return time.Duration(total) * time.Second / ticksPerSecond, true
}

// cpuMeter measures the CPU used by this process and by the database server between start and
// stop.
type cpuMeter struct {
	ctx       context.Context
	pool      *pgxpool.Pool
	proc, db  time.Duration
	dbVisible bool
}

func startCPU(ctx context.Context, pool *pgxpool.Pool) *cpuMeter {
	m := &cpuMeter{ctx: ctx, pool: pool, proc: processCPU()}
	m.db, m.dbVisible = clusterCPU(ctx, pool)
	return m
}

func (m *cpuMeter) stop() (proc, db time.Duration) {
	proc = processCPU() - m.proc
	if d, ok := clusterCPU(m.ctx, m.pool); ok && m.dbVisible {
		db = d - m.db
	}
	return proc, db
}

type dueBaseline struct {
	insertSelect, insertJobs, total time.Duration
	heap                            uint64
	goCPU, dbCPU                    time.Duration
}

// Due measures the due computation (jobs.Due) with Plans active plans all due, next to a
// baseline measured in the same run on the same database, before and after it (the machine is
// shared: the two bracket the noise): a plain INSERT ... SELECT of as many charge rows (into a
// copy of billing.charges with its indexes, checks and foreign keys) plus River's
// InsertManyFast of as many charge jobs. It writes both times, CPU (this process and the
// database server's, when it runs on this machine), the peak Go heap of each phase and the
// process's peak RSS to w.
func Due(ctx context.Context, srv *Server, logger *slog.Logger, o DueOptions, w io.Writer) (DueResult, error) {
	res := DueResult{Options: o}
	n := o.Plans
	dbURL, drop, err := srv.NewDatabase(ctx, logger)
	if err != nil {
		return res, err
	}
	defer drop()
	cfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		return res, err
	}
	cfg.MaxConns = int32(max(o.Workers, 1) + 2)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return res, err
	}
	defer pool.Close()
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{Logger: logger})
	if err != nil {
		return res, err
	}
	var execErr error
	exec := func(sql string, args ...any) {
		if execErr != nil {
			return
		}
		if _, err := pool.Exec(ctx, sql, args...); err != nil {
			execErr = fmt.Errorf("%s: %w", strings.Fields(sql)[0], err)
		}
	}

	// Seed: n/100 customers, n plans whose first installment fell due a minute ago.
	seedStart := time.Now()
	exec(`insert into billing.customers (customer_ref) select 'bench-' || i from generate_series(1, greatest($1 / 100, 1)) i`, n)
	exec(`alter table billing.installment_plans disable trigger installment_plans_monthly_fill`)
	cronExpr := any(nil)
	if o.Kind == "cron" {
		cronExpr = "0 9 1 * *"
	} else if o.Kind != "monthly" {
		return res, fmt.Errorf("kind %q: want monthly or cron", o.Kind)
	}
	exec(seedPlansQuery, n, cronExpr)
	exec(`alter table billing.installment_plans enable trigger installment_plans_monthly_fill`)
	exec(`vacuum analyze billing.installment_plans`)
	exec(`analyze billing.customers`)
	if execErr != nil {
		return res, execErr
	}
	fmt.Fprintf(w, "seeded %d %s plans in %s\n", n, o.Kind, time.Since(seedStart).Round(time.Millisecond))

	baseline := func() (dueBaseline, error) {
		exec(`create table bench_charges (like billing.charges including all)`)
		exec(`alter table bench_charges add foreign key (customer_id) references billing.customers (id),
			add foreign key (currency) references billing.currencies (code),
			add foreign key (payment_method_id) references billing.payment_methods (id)`)
		exec(`truncate river_job`)
		exec(`checkpoint`)
		var r dueBaseline
		if execErr != nil {
			return r, execErr
		}
		stopHeap := heapPeak()
		cpu := startCPU(ctx, pool)
		t0 := time.Now()
		exec(baselineInsertQuery)
		r.insertSelect = time.Since(t0)
		t1 := time.Now()
		params := make([]river.InsertManyParams, 0, o.Batch)
		for first := 1; first <= n; first += o.Batch {
			params = params[:0]
			for id := first; id < first+o.Batch && id <= n; id++ {
				params = append(params, river.InsertManyParams{Args: jobs.ChargeArgs{ChargeID: int64(id)}})
			}
			if _, err := client.InsertManyFast(ctx, params); err != nil {
				return r, err
			}
		}
		r.insertJobs = time.Since(t1)
		r.total = time.Since(t0)
		r.goCPU, r.dbCPU = cpu.stop()
		r.heap = stopHeap()
		exec(`drop table bench_charges`)
		exec(`truncate river_job`)
		exec(`checkpoint`)
		return r, execErr
	}
	line := func(name string, r dueBaseline) string {
		return fmt.Sprintf("  baseline %-6s INSERT ... SELECT %7.2fs + InsertManyFast %7.2fs = %7.2fs  %7.0f rows/s  cpu go %6.2fs db %6.2fs  peak heap %5.1f MiB\n",
			name, r.insertSelect.Seconds(), r.insertJobs.Seconds(), r.total.Seconds(), float64(n)/r.total.Seconds(),
			r.goCPU.Seconds(), r.dbCPU.Seconds(), float64(r.heap)/mib)
	}
	fmt.Fprintf(w, "due computation, %d %s plans all due (batch %d, %d workers, GOMAXPROCS %d, NumCPU %d)\n",
		n, o.Kind, o.Batch, max(o.Workers, 1), runtime.GOMAXPROCS(0), runtime.NumCPU())
	before, err := baseline()
	if err != nil {
		return res, fmt.Errorf("baseline: %w", err)
	}
	fmt.Fprint(w, line("before", before))

	due := &jobs.Due{Pool: pool, Logger: logger, BatchSize: o.Batch, Workers: o.Workers}
	stopHeap := heapPeak()
	cpu := startCPU(ctx, pool)
	t2 := time.Now()
	dr, err := due.Run(ctx, time.Now())
	elapsed := time.Since(t2)
	dueGoCPU, dueDBCPU := cpu.stop()
	dueHeap := stopHeap()
	if err != nil {
		return res, fmt.Errorf("due computation: %w", err)
	}
	var charges, jobRows int
	if err := pool.QueryRow(ctx, `select (select count(*) from billing.charges), (select count(*) from river_job where kind = 'charge')`).Scan(&charges, &jobRows); err != nil {
		return res, err
	}
	if dr.Installments != n || charges != n || jobRows != n {
		return res, fmt.Errorf("due computation made %d installments, %d charges, %d jobs for %d plans", dr.Installments, charges, jobRows, n)
	}
	after, err := baseline()
	if err != nil {
		return res, fmt.Errorf("baseline: %w", err)
	}
	mean := (before.total + after.total) / 2

	fmt.Fprintf(w, "  due computation: charges + jobs + plans advanced        = %7.2fs  %7.0f rows/s  cpu go %6.2fs db %6.2fs  peak heap %5.1f MiB  (%d batches)\n",
		elapsed.Seconds(), float64(n)/elapsed.Seconds(), dueGoCPU.Seconds(), dueDBCPU.Seconds(), float64(dueHeap)/mib, dr.Batches)
	fmt.Fprint(w, line("after", after))
	meanCPU := (before.goCPU + before.dbCPU + after.goCPU + after.dbCPU) / 2
	res.Elapsed, res.Baseline = elapsed, mean
	res.TimeRatio = elapsed.Seconds() / mean.Seconds()
	res.CPURatio = (dueGoCPU + dueDBCPU).Seconds() / meanCPU.Seconds()
	res.Heap, res.RSS = dueHeap, uint64(max(maxRSS(), 0))
	fmt.Fprintf(w, "  due / mean baseline: time %.2fx, cpu %.2fx   process peak RSS %.1f MiB   load average %s\n",
		res.TimeRatio, res.CPURatio, float64(res.RSS)/mib, loadAverage())
	return res, nil
}

const seedPlansQuery = `insert into billing.installment_plans (customer_id, description, total_amount, currency, installment_count,
		remainder_installment, schedule_kind, cron_expr, anchor_day, time_zone, starts_at, first_month, due_time,
		next_due_at, status)
	select c.id, 'Bench plan', 12000 + i % 7, 'usd', 12, 'first',
		case when $2::text is null then 'monthly' else 'cron' end, $2::text,
		case when $2::text is null then 1 + i % 28 end, 'Europe/Paris', s.at,
		case when $2::text is null then billing.monthly_first_month(s.at, 'Europe/Paris', 1 + i % 28) end,
		case when $2::text is null then (s.at at time zone 'Europe/Paris')::time end,
		now() - interval '1 minute', 'active'
	  from generate_series(1, $1::int) i
	  join billing.customers c on c.id = 1 + i % greatest($1 / 100, 1)
	  cross join (select now() - interval '1 minute' as at) s`

const baselineInsertQuery = `insert into bench_charges (customer_id, source, source_id, period, amount, currency, description, due_at)
	select customer_id, 'installment', id, next_installment::text, total_amount / installment_count, currency,
	       description || ' (installment ' || next_installment || ' of ' || installment_count || ')', next_due_at
	  from billing.installment_plans where status = 'active'`

func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}
