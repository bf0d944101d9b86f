package worker

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// dbCollector reports, at each scrape, gauges read from the database: River's queue depth by
// queue and state, and billing's charges by status. It asks with a short timeout so that a slow
// database slows a scrape, never the daemon.
type dbCollector struct {
	pool    *pgxpool.Pool
	logger  *slog.Logger
	queue   *prometheus.Desc
	charges *prometheus.Desc
	up      *prometheus.Desc
}

func newDBCollector(pool *pgxpool.Pool, logger *slog.Logger) *dbCollector {
	return &dbCollector{
		pool:   pool,
		logger: logger,
		queue: prometheus.NewDesc("billingd_queue_jobs", "River jobs by queue and state (available, running, retryable, scheduled).",
			[]string{"queue", "state"}, nil),
		charges: prometheus.NewDesc("billingd_charges", "Charges by status and currency.",
			[]string{"status", "currency"}, nil),
		up: prometheus.NewDesc("billingd_database_up", "1 when the scrape could read the database.", nil, nil),
	}
}

const (
	queueDepthQuery = `
select queue, state::text, count(*)
from river_job
where state in ('available', 'running', 'retryable', 'scheduled')
group by queue, state`

	chargesByStatusQuery = `select status, currency, count(*) from billing.charges group by status, currency`
)

func (c *dbCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.queue
	ch <- c.charges
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
	if err := c.gauges(ctx, ch, c.charges, chargesByStatusQuery); err != nil {
		up = 0
		c.logger.Warn("metrics: read charges by status", "error", err)
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
