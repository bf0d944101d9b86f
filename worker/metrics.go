package worker

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// dbCollector reports, at each scrape, gauges read from the database: River's queue depth by
// queue and state, billing's open charges by status, and how late the due computation is. Every
// query reads an index bounded by open work, not by history, so a scrape costs the same after
// years of charges; each asks with a short timeout so that a slow database slows a scrape, never
// the daemon.
type dbCollector struct {
	pool    *pgxpool.Pool
	logger  *slog.Logger
	queue   *prometheus.Desc
	charges *prometheus.Desc
	dueLag  *prometheus.Desc
	up      *prometheus.Desc
}

func newDBCollector(pool *pgxpool.Pool, logger *slog.Logger) *dbCollector {
	return &dbCollector{
		pool:   pool,
		logger: logger,
		queue: prometheus.NewDesc("billingd_queue_jobs", "River jobs by queue and state (available, running, retryable, scheduled).",
			[]string{"queue", "state"}, nil),
		charges: prometheus.NewDesc("billingd_open_charges",
			"Charges not yet settled (pending, processing, retry_scheduled, recovering) by status and currency; settled ones are counted by billingd_charge_outcomes_total.",
			[]string{"status", "currency"}, nil),
		dueLag: prometheus.NewDesc("billingd_due_lag_seconds",
			"How long the oldest installment or scheduled top-up that has fallen due has waited to be charged; 0 when none is waiting. It grows while no due computation completes.",
			[]string{"source"}, nil),
		up: prometheus.NewDesc("billingd_database_up", "1 when the scrape could read the database.", nil, nil),
	}
}

const (
	queueDepthQuery = `
select queue, state::text, count(*)
from river_job
where state in ('available', 'running', 'retryable', 'scheduled')
group by queue, state`

	// Through charges_open_status_idx: the terminal statuses, which grow for ever, are not read.
	openChargesQuery = `
select status, currency, count(*)
from billing.charges
where status not in ('succeeded', 'recovered', 'uncollectible', 'canceled')
group by status, currency`

	// The first entry of each due index (installment_plans_due_idx, topup_rules_scheduled_due_idx).
	dueLagQuery = `
select 'installment', coalesce(extract(epoch from now() - min(next_due_at)), 0)::float8
from billing.installment_plans where status = 'active' and next_due_at <= now()
union all
select 'topup', coalesce(extract(epoch from now() - min(next_due_at)), 0)::float8
from billing.topup_rules where kind = 'scheduled' and status = 'active' and next_due_at <= now()`
)

func (c *dbCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.queue
	ch <- c.charges
	ch <- c.dueLag
	ch <- c.up
}

func (c *dbCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	up := 1.0
	if err := c.gauges(ctx, ch, c.queue, queueDepthQuery); err != nil {
		up = 0
		c.logger.Warn("metrics: read queue depth", "error", err)
	}
	if err := c.gauges(ctx, ch, c.charges, openChargesQuery); err != nil {
		up = 0
		c.logger.Warn("metrics: read open charges by status", "error", err)
	}
	if err := c.dueLags(ctx, ch); err != nil {
		up = 0
		c.logger.Warn("metrics: read the due lag", "error", err)
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, up)
}

// gauges emits one gauge per row of a query that returns two labels and a count.
func (c *dbCollector) gauges(ctx context.Context, ch chan<- prometheus.Metric, desc *prometheus.Desc, sql string) error {
	rows, err := c.pool.Query(ctx, sql)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var a, b string
		var n int64
		if err := rows.Scan(&a, &b, &n); err != nil {
			return err
		}
		ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, float64(n), a, b)
	}
	return rows.Err()
}

// dueLags emits billingd_due_lag_seconds per source.
func (c *dbCollector) dueLags(ctx context.Context, ch chan<- prometheus.Metric) error {
	rows, err := c.pool.Query(ctx, dueLagQuery)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var source string
		var lag float64
		if err := rows.Scan(&source, &lag); err != nil {
			return err
		}
		ch <- prometheus.MustNewConstMetric(c.dueLag, prometheus.GaugeValue, lag, source)
	}
	return rows.Err()
}
