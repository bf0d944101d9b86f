package jobs_test

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/jobs"
)

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return n
	}
	return def
}

var (
	benchPlans   = flag.Int("due.plans", envInt("BILLING_BENCH_PLANS", 10_000), "active plans, all due, for BenchmarkDue ($BILLING_BENCH_PLANS)")
	benchBatch   = flag.Int("due.batch", envInt("BILLING_DUE_BATCH_SIZE", 5000), "rows per transaction ($BILLING_DUE_BATCH_SIZE)")
	benchWorkers = flag.Int("due.workers", envInt("BILLING_BENCH_DUE_WORKERS", 2), "due transactions in flight ($BILLING_BENCH_DUE_WORKERS)")
	benchKind    = flag.String("due.kind", "monthly", "schedule of the seeded plans: monthly (next date in SQL) or cron (next date in Go)")
)

// BenchmarkDue measures the due computation with N active plans all due (one installment each),
// next to a baseline measured in the same run on the same database: a plain INSERT ... SELECT of
// as many charge rows (into a copy of billing.charges with its indexes, checks and foreign keys)
// plus River's InsertManyFast of as many charge jobs. It prints both times and the peak Go heap
// of each phase, and the process's peak RSS. Run it once:
//
//	go test -run '^$' -bench BenchmarkDue -benchtime 1x ./jobs -due.plans 1000000
func BenchmarkDue(b *testing.B) {
	for range b.N {
		benchmarkDueOnce(b, *benchPlans)
	}
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

func benchmarkDueOnce(b *testing.B, n int) {
	b.StopTimer()
	ctx := context.Background()
	dbURL := dbtest.NewDB(b)
	cfg, err := pgxpool.ParseConfig(dbURL)
	require.NoError(b, err)
	cfg.MaxConns = int32(*benchWorkers + 2)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(b, err)
	defer pool.Close()
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{Logger: quiet})
	require.NoError(b, err)

	// Seed: n/100 customers, n plans whose first installment fell due a minute ago.
	seedStart := time.Now()
	exec := func(sql string, args ...any) {
		_, err := pool.Exec(ctx, sql, args...)
		require.NoError(b, err, sql)
	}
	exec(`insert into billing.customers (customer_ref) select 'bench-' || i from generate_series(1, greatest($1 / 100, 1)) i`, n)
	exec(`alter table billing.installment_plans disable trigger installment_plans_monthly_fill`)
	cronExpr := any(nil)
	if *benchKind == "cron" {
		cronExpr = "0 9 1 * *"
	} else if *benchKind != "monthly" {
		b.Fatalf("-due.kind %q: want monthly or cron", *benchKind)
	}
	exec(`insert into billing.installment_plans (customer_id, description, total_amount, currency, installment_count,
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
		  cross join (select now() - interval '1 minute' as at) s`, n, cronExpr)
	exec(`alter table billing.installment_plans enable trigger installment_plans_monthly_fill`)
	exec(`vacuum analyze billing.installment_plans`)
	exec(`analyze billing.customers`)
	b.Logf("seeded %d %s plans in %s", n, *benchKind, time.Since(seedStart).Round(time.Millisecond))

	// Baseline: the same rows and jobs written the plainest way, before and after the due
	// computation (the machine is shared: the two bracket the noise).
	type baselineRun struct {
		insertSelect, insertJobs, total time.Duration
		heap                            uint64
		goCPU, dbCPU                    time.Duration
	}
	baseline := func() baselineRun {
		exec(`create table bench_charges (like billing.charges including all)`)
		exec(`alter table bench_charges add foreign key (customer_id) references billing.customers (id),
			add foreign key (currency) references billing.currencies (code),
			add foreign key (payment_method_id) references billing.payment_methods (id)`)
		exec(`truncate river_job`)
		exec(`checkpoint`)
		var r baselineRun
		stopHeap := heapPeak()
		cpu := startCPU(ctx, pool)
		t0 := time.Now()
		exec(`insert into bench_charges (customer_id, source, source_id, period, amount, currency, description, due_at)
			select customer_id, 'installment', id, next_installment::text, total_amount / installment_count, currency,
			       description || ' (installment ' || next_installment || ' of ' || installment_count || ')', next_due_at
			  from billing.installment_plans where status = 'active'`)
		r.insertSelect = time.Since(t0)
		t1 := time.Now()
		params := make([]river.InsertManyParams, 0, *benchBatch)
		for first := 1; first <= n; first += *benchBatch {
			params = params[:0]
			for id := first; id < first+*benchBatch && id <= n; id++ {
				params = append(params, river.InsertManyParams{Args: jobs.ChargeArgs{ChargeID: int64(id)}})
			}
			_, err := client.InsertManyFast(ctx, params)
			require.NoError(b, err)
		}
		r.insertJobs = time.Since(t1)
		r.total = time.Since(t0)
		r.goCPU, r.dbCPU = cpu.stop()
		r.heap = stopHeap()
		exec(`drop table bench_charges`)
		exec(`truncate river_job`)
		exec(`checkpoint`)
		return r
	}
	before := baseline()

	// The due computation.
	logger := quiet
	if testing.Verbose() {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	due := &jobs.Due{Pool: pool, Client: client, Logger: logger, BatchSize: *benchBatch, Workers: *benchWorkers}
	stopHeap := heapPeak()
	cpu := startCPU(ctx, pool)
	b.StartTimer()
	t2 := time.Now()
	res, err := due.Run(ctx, time.Now())
	elapsed := time.Since(t2)
	b.StopTimer()
	dueGoCPU, dueDBCPU := cpu.stop()
	dueHeap := stopHeap()
	require.NoError(b, err)
	require.Equal(b, n, res.Installments)
	var charges, jobRows int
	require.NoError(b, pool.QueryRow(ctx, `select (select count(*) from billing.charges), (select count(*) from river_job where kind = 'charge')`).Scan(&charges, &jobRows))
	require.Equal(b, n, charges)
	require.Equal(b, n, jobRows)
	after := baseline()
	mean := (before.total + after.total) / 2

	b.ReportMetric(float64(n)/elapsed.Seconds(), "charges/s")
	b.ReportMetric(elapsed.Seconds()/mean.Seconds(), "x_baseline")
	line := func(name string, r baselineRun) string {
		return fmt.Sprintf("  baseline %-6s INSERT ... SELECT %7.2fs + InsertManyFast %7.2fs = %7.2fs  %7.0f rows/s  cpu go %6.2fs db %6.2fs  peak heap %5.1f MiB\n",
			name, r.insertSelect.Seconds(), r.insertJobs.Seconds(), r.total.Seconds(), float64(n)/r.total.Seconds(),
			r.goCPU.Seconds(), r.dbCPU.Seconds(), float64(r.heap)/mib)
	}
	fmt.Fprintf(os.Stderr, "\ndue computation, %d %s plans all due (batch %d, %d workers, GOMAXPROCS %d, NumCPU %d)\n",
		n, *benchKind, *benchBatch, max(*benchWorkers, 1), runtime.GOMAXPROCS(0), runtime.NumCPU())
	fmt.Fprint(os.Stderr, line("before", before))
	fmt.Fprintf(os.Stderr, "  due computation: charges + jobs + plans advanced        = %7.2fs  %7.0f rows/s  cpu go %6.2fs db %6.2fs  peak heap %5.1f MiB  (%d batches)\n",
		elapsed.Seconds(), float64(n)/elapsed.Seconds(), dueGoCPU.Seconds(), dueDBCPU.Seconds(), float64(dueHeap)/mib, res.Batches)
	fmt.Fprint(os.Stderr, line("after", after))
	meanCPU := (before.goCPU + before.dbCPU + after.goCPU + after.dbCPU) / 2
	fmt.Fprintf(os.Stderr, "  due / mean baseline: time %.2fx, cpu %.2fx   process peak RSS %.1f MiB   load average %s\n",
		elapsed.Seconds()/mean.Seconds(), (dueGoCPU+dueDBCPU).Seconds()/meanCPU.Seconds(), float64(maxRSS())/mib, loadAverage())
}

func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}
