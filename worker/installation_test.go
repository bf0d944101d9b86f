package worker_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/worker"
)

// A database without an installation id stops the daemon's start with the reason, before any
// job runs: billingd never sends a key or creates a Stripe object without the id.
func TestDaemonRefusesToStartWithoutAnInstallationID(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewDB(t)
	cfg := &config.Config{}
	env := map[string]string{"DATABASE_URL": dbURL, "STRIPE_SECRET_KEY": "sk_test_x", "STRIPE_WEBHOOK_SECRET": "whsec_x"}
	require.NoError(t, config.NewFlagSet("run", cfg, func(k string) string { return env[k] }).Parse(nil))
	pool := dbtest.Pool(t, dbURL)
	_, err := pool.Exec(context.Background(), `delete from billing.installation`)
	require.NoError(t, err)

	d, err := worker.New(cfg, pool, slog.New(slog.NewTextHandler(io.Discard, nil)))
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	// A daemon that started anyway stops after a while, without the error.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	err = d.Serve(ctx, ln)
	require.ErrorContains(t, err, "billing.installation has no row")
	require.NotContains(t, err.Error(), "sk_test_x")
}
