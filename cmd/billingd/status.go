package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/jobs"
)

// statusQueries are the read-only questions `billingd status` asks, in the order it prints them.
const (
	statusCharges = `
select status, currency, count(*), sum(amount)
from billing.charges
group by status, currency
order by array_position(array['pending','processing','retry_scheduled','recovering',
         'succeeded','recovered','uncollectible','canceled'], status), currency`

	// OLDEST is how long the oldest due one has waited (billingd_due_lag_seconds): more than a
	// few due periods means the due computation is not running.
	statusDue = `
select 'installment plans' as what, count(*) filter (where next_due_at <= now()), count(*),
       coalesce(extract(epoch from now() - min(next_due_at) filter (where next_due_at <= now()))::bigint, 0)
from billing.installment_plans where status = 'active'
union all
select 'top-up rules', count(*) filter (where next_due_at <= now()), count(*),
       coalesce(extract(epoch from now() - min(next_due_at) filter (where next_due_at <= now()))::bigint, 0)
from billing.topup_rules where status = 'active'`

	statusAttempts = `
select outcome, count(*), coalesce(extract(epoch from now() - min(started_at))::bigint, 0)
from billing.charge_attempts
where outcome in ('in_flight', 'unknown')
group by outcome order by outcome`

	statusQueue = `
select queue, state, count(*)
from river_job
where state in ('available', 'running', 'retryable', 'scheduled')
group by queue, state order by queue, state`

	statusRecoveries = `
select count(*), coalesce(extract(epoch from now() - min(opened_at))::bigint, 0)
from billing.recoveries where status = 'open'`
)

func cmdStatus(ctx context.Context, args []string, env config.Env, stdout, stderr io.Writer) error {
	cfg, err := parse("status", args, env, stderr, config.NeedDatabase)
	if err != nil {
		return err
	}
	pool, err := connect(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()

	w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	section := func(title, header string, sql string, row func(pgx.Rows) ([]any, error)) error {
		fmt.Fprintf(w, "\n%s\n%s\n", title, header)
		rows, err := pool.Query(ctx, sql)
		if err != nil {
			return fmt.Errorf("%s: %w", title, err)
		}
		defer rows.Close()
		n := 0
		for rows.Next() {
			vals, err := row(rows)
			if err != nil {
				return err
			}
			for i, v := range vals {
				if i > 0 {
					fmt.Fprint(w, "\t")
				}
				fmt.Fprint(w, v)
			}
			fmt.Fprintln(w)
			n++
		}
		if n == 0 {
			fmt.Fprintln(w, "(none)")
		}
		return rows.Err()
	}

	installation, err := jobs.LoadInstallation(ctx, pool)
	if err != nil {
		installation = "unknown (" + err.Error() + ")"
	}
	fmt.Fprintf(w, "billingd status at %s, installation %s\n", time.Now().UTC().Format(time.RFC3339), installation)
	if err := section("Charges", "STATUS\tCURRENCY\tCOUNT\tAMOUNT (minor units)", statusCharges, func(r pgx.Rows) ([]any, error) {
		var s, c string
		var n, sum int64
		err := r.Scan(&s, &c, &n, &sum)
		return []any{s, c, n, sum}, err
	}); err != nil {
		return err
	}
	if err := section("Due", "SOURCE\tDUE NOW\tACTIVE\tOLDEST DUE", statusDue, func(r pgx.Rows) ([]any, error) {
		var s string
		var due, all, age int64
		err := r.Scan(&s, &due, &all, &age)
		return []any{s, due, all, time.Duration(age) * time.Second}, err
	}); err != nil {
		return err
	}
	if err := section("Attempts awaiting an outcome", "OUTCOME\tCOUNT\tOLDEST", statusAttempts, func(r pgx.Rows) ([]any, error) {
		var s string
		var n, age int64
		err := r.Scan(&s, &n, &age)
		return []any{s, n, time.Duration(age) * time.Second}, err
	}); err != nil {
		return err
	}
	if err := section("Recovering", "OPEN\tOLDEST", statusRecoveries, func(r pgx.Rows) ([]any, error) {
		var n, age int64
		err := r.Scan(&n, &age)
		return []any{n, time.Duration(age) * time.Second}, err
	}); err != nil {
		return err
	}
	if err := section("Job queues", "QUEUE\tSTATE\tJOBS", statusQueue, func(r pgx.Rows) ([]any, error) {
		var q, s string
		var n int64
		err := r.Scan(&q, &s, &n)
		return []any{q, s, n}, err
	}); err != nil {
		return err
	}
	return w.Flush()
}
