package worker

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/jobs"
)

// scrape gathers the database collector once and returns its gauges by name and label values.
func scrape(t *testing.T, c prometheus.Collector) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(c))
	families, err := reg.Gather()
	require.NoError(t, err)
	out := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			key := f.GetName()
			for _, l := range m.GetLabel() {
				key += " " + l.GetName() + "=" + l.GetValue()
			}
			out[key] = m.GetGauge().GetValue()
		}
	}
	return out
}

// TestDBCollectorOpenChargesAndDueLag checks the gauges read from the database: settled charges
// are not counted as open, and the due lag is how long the oldest due plan or scheduled top-up has
// waited, back to 0 once a due computation has charged them.
func TestDBCollectorOpenChargesAndDueLag(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := dbtest.NewPool(t)
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	c := dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "alice"})
	exec := func(sql string, args ...any) {
		t.Helper()
		_, err := pool.Exec(ctx, sql, args...)
		require.NoError(t, err)
	}
	exec(`insert into billing.charges (customer_id, source, amount, currency, description, requested_by)
		select $1, 'adhoc', 100 * i, 'usd', 'fee', 'finance' from generate_series(1, 3) i`, c.ID)
	exec(`update billing.charges set status = 'processing' where amount = 300`)
	exec(`update billing.charges set status = 'succeeded' where amount = 300`)
	exec(`select billing.create_installment_plan('alice', 'Sofa', 900, 'usd', 3, anchor_day => 1, starts_at => now())`)
	exec(`update billing.installment_plans set next_due_at = now() - interval '1 hour'`)
	exec(`select billing.create_topup_rule('alice', 'Monthly', 'usd', fixed_amount => 700, cron_expr => '0 9 1 * *')`)
	exec(`update billing.topup_rules set status = 'active', next_due_at = now() - interval '2 hours'`)

	collector := newDBCollector(pool, logger)
	got := scrape(t, collector)
	require.Equal(t, 1.0, got["billingd_database_up"])
	require.Equal(t, 2.0, got["billingd_open_charges currency=usd status=pending"])
	require.NotContains(t, got, "billingd_open_charges currency=usd status=succeeded")
	require.InDelta(t, 3600, got["billingd_due_lag_seconds source=installment"], 60)
	require.InDelta(t, 7200, got["billingd_due_lag_seconds source=topup"], 60)

	due := &jobs.Due{Pool: pool, Logger: logger, BatchSize: 10}
	res, err := due.Run(ctx, time.Now())
	require.NoError(t, err)
	require.Equal(t, 1, res.Installments)
	require.Equal(t, 1, res.Topups)
	got = scrape(t, collector)
	require.Equal(t, 0.0, got["billingd_due_lag_seconds source=installment"])
	require.Equal(t, 0.0, got["billingd_due_lag_seconds source=topup"])
	require.Equal(t, 4.0, got["billingd_open_charges currency=usd status=pending"])
}
