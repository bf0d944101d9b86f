package worker_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/worker"
)

// startDaemon serves a daemon on a free port until the test ends and returns its base URL.
func startDaemon(t *testing.T, env map[string]string) string {
	t.Helper()
	dbURL := dbtest.NewDB(t)
	env["DATABASE_URL"] = dbURL
	cfg := &config.Config{}
	fs := config.NewFlagSet("run", cfg, func(k string) string { return env[k] })
	require.NoError(t, fs.Parse(nil))
	pool := dbtest.Pool(t, dbURL)
	c := dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "metrics-1"})
	_, err := pool.Exec(context.Background(), `insert into billing.charges (customer_id, source, amount, currency, description, requested_by)
		values ($1, 'adhoc', 500, 'usd', 'fee', 'finance'), ($1, 'adhoc', 700, 'usd', 'fee', 'finance')`, c.ID)
	require.NoError(t, err)

	d, err := worker.New(cfg, pool, slog.New(slog.NewTextHandler(io.Discard, nil)))
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		require.NoError(t, d.Serve(ctx, ln))
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	base := "http://" + ln.Addr().String()
	require.Eventually(t, func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 10*time.Second, 20*time.Millisecond)
	return base
}

func get(t *testing.T, url string, auth ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	require.NoError(t, err)
	if len(auth) == 2 {
		req.SetBasicAuth(auth[0], auth[1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

func TestMetricsAndRiverUI(t *testing.T) {
	t.Parallel()
	base := startDaemon(t, map[string]string{
		"STRIPE_SECRET_KEY":        "sk_test_metrics",
		"STRIPE_WEBHOOK_SECRET":    "whsec_metrics",
		"STRIPE_API_BASE":          "http://127.0.0.1:1",
		"BILLING_RIVERUI_USER":     "ops",
		"BILLING_RIVERUI_PASSWORD": "ui-secret",
	})

	status, body := get(t, base+"/metrics")
	require.Equal(t, http.StatusOK, status)
	require.Contains(t, body, `billingd_open_charges{currency="usd",status="pending"} 2`)
	require.Contains(t, body, `billingd_database_up 1`)
	require.Contains(t, body, `go_goroutines`)
	require.NotContains(t, body, "sk_test_metrics")
	require.NotContains(t, body, "ui-secret")

	status, _ = get(t, base+"/riverui/")
	require.Equal(t, http.StatusUnauthorized, status)
	status, _ = get(t, base+"/riverui/", "ops", "wrong")
	require.Equal(t, http.StatusUnauthorized, status)
	status, body = get(t, base+"/riverui/", "ops", "ui-secret")
	require.Equal(t, http.StatusOK, status)
	require.Contains(t, body, "<html")
}

func TestRiverUIIsOffWithoutCredentials(t *testing.T) {
	t.Parallel()
	base := startDaemon(t, map[string]string{
		"STRIPE_SECRET_KEY":     "sk_test_metrics",
		"STRIPE_WEBHOOK_SECRET": "whsec_metrics",
		"STRIPE_API_BASE":       "http://127.0.0.1:1",
	})
	status, _ := get(t, base+"/riverui/")
	require.Equal(t, http.StatusNotFound, status)
}
