package main

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

func envOf(kv map[string]string) func(string) string {
	return func(k string) string { return kv[k] }
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().String()
}

func TestRunRefusesMissingOrBadSettings(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		env  map[string]string
		want []string
	}{
		{"nothing set", map[string]string{}, []string{"DATABASE_URL", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"}},
		{"publishable key", map[string]string{"DATABASE_URL": "postgres://x@127.0.0.1/x", "STRIPE_SECRET_KEY": "pk_test_123", "STRIPE_WEBHOOK_SECRET": "whsec_1"}, []string{"STRIPE_SECRET_KEY must be a secret key"}},
		{"malformed worker count", map[string]string{"DATABASE_URL": "postgres://x@127.0.0.1/x", "STRIPE_SECRET_KEY": "sk_test_1", "STRIPE_WEBHOOK_SECRET": "whsec_1", "BILLING_MAX_WORKERS": "many"}, []string{`BILLING_MAX_WORKERS="many" is not an integer`}},
		{"bad schedule", map[string]string{"DATABASE_URL": "postgres://x@127.0.0.1/x", "STRIPE_SECRET_KEY": "sk_test_1", "STRIPE_WEBHOOK_SECRET": "whsec_1", "BILLING_DUE_SCHEDULE": "every day"}, []string{"BILLING_DUE_SCHEDULE"}},
		{"bad http addr", map[string]string{"DATABASE_URL": "postgres://x@127.0.0.1/x", "STRIPE_SECRET_KEY": "sk_test_1", "STRIPE_WEBHOOK_SECRET": "whsec_1", "BILLING_HTTP_ADDR": "8080"}, []string{"BILLING_HTTP_ADDR"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			err := run(context.Background(), []string{"run"}, envOf(tc.env), &bytes.Buffer{}, &stderr)
			require.Error(t, err)
			require.NotContains(t, err.Error(), "\n", "one line")
			for _, w := range tc.want {
				require.Contains(t, err.Error(), w)
			}
			require.NotContains(t, err.Error(), "sk_test_1", "secrets never echoed")
			require.NotContains(t, err.Error(), "whsec_1", "secrets never echoed")
		})
	}
}

func TestRunUnreachableDatabaseIsOneLine(t *testing.T) {
	t.Parallel()
	addr := freeAddr(t) // nothing listens there
	env := envOf(map[string]string{
		"DATABASE_URL":          "postgres://u:s3cret@" + addr + "/x?sslmode=disable&connect_timeout=2",
		"STRIPE_SECRET_KEY":     "sk_test_1",
		"STRIPE_WEBHOOK_SECRET": "whsec_1",
	})
	err := run(context.Background(), []string{"run"}, env, &bytes.Buffer{}, &bytes.Buffer{})
	require.Error(t, err)
	require.Contains(t, err.Error(), "DATABASE_URL: cannot reach the database")
	require.NotContains(t, err.Error(), "s3cret")
	require.NotContains(t, err.Error(), "\n")
}

func TestRunRefusesUnmigratedDatabase(t *testing.T) {
	t.Parallel()
	env := envOf(map[string]string{
		"DATABASE_URL":          dbtest.NewEmptyDB(t, dbtest.ServerURL(t)),
		"STRIPE_SECRET_KEY":     "sk_test_1",
		"STRIPE_WEBHOOK_SECRET": "whsec_1",
		"BILLING_HTTP_ADDR":     freeAddr(t),
	})
	err := run(context.Background(), []string{"run"}, env, &bytes.Buffer{}, &bytes.Buffer{})
	require.ErrorContains(t, err, "run `billingd migrate` first")
}

func TestMigrateTwice(t *testing.T) {
	t.Parallel()
	env := envOf(map[string]string{"DATABASE_URL": dbtest.NewEmptyDB(t, dbtest.ServerURL(t))})
	var out bytes.Buffer
	require.NoError(t, run(context.Background(), []string{"migrate"}, env, &out, &bytes.Buffer{}))
	require.Regexp(t, `migrated: [1-9][0-9]* River and [1-9][0-9]* billing migrations applied`, out.String())
	out.Reset()
	require.NoError(t, run(context.Background(), []string{"migrate"}, env, &out, &bytes.Buffer{}))
	require.Contains(t, out.String(), "migrated: 0 River and 0 billing migrations applied")
}

// TestDaemonStartsReadyAndStopsOnSIGTERM runs the real binary: it must report ready, answer the
// healthcheck subcommand, and exit 0 on SIGTERM within its soft-stop timeout.
func TestDaemonStartsReadyAndStopsOnSIGTERM(t *testing.T) {
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "billingd")
	build := exec.Command("go", "build", "-o", bin, ".")
	out, err := build.CombinedOutput()
	require.NoError(t, err, "%s", out)

	addr := freeAddr(t)
	cmd := exec.Command(bin, "run", "-soft-stop-timeout", "5s")
	cmd.Env = append(os.Environ(),
		"DATABASE_URL="+dbtest.NewDB(t),
		"STRIPE_SECRET_KEY=sk_test_lifecycle",
		"STRIPE_WEBHOOK_SECRET=whsec_lifecycle",
		"STRIPE_API_BASE=http://127.0.0.1:1",
		"BILLING_HTTP_ADDR="+addr,
	)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill() })

	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 20*time.Second, 50*time.Millisecond, "daemon never became ready: %s", &logs)

	hc := exec.Command(bin, "healthcheck")
	hc.Env = append(os.Environ(), "BILLING_HTTP_ADDR="+addr)
	out, err = hc.CombinedOutput()
	require.NoError(t, err, "%s", out)

	start := time.Now()
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		require.NoError(t, err, "exit status after SIGTERM; logs:\n%s", &logs)
	case <-time.After(15 * time.Second):
		t.Fatalf("daemon did not stop within 15s of SIGTERM; logs:\n%s", &logs)
	}
	require.Less(t, time.Since(start), 6*time.Second)
	require.Contains(t, logs.String(), "billingd stopped")
	require.NotContains(t, logs.String(), "sk_test_lifecycle")

	// Once stopped, the healthcheck fails.
	hc = exec.Command(bin, "healthcheck")
	hc.Env = append(os.Environ(), "BILLING_HTTP_ADDR="+addr)
	require.Error(t, hc.Run())
}

func TestStatusReportsCharges(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewDB(t)
	pool := dbtest.Pool(t, dbURL)
	c := dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "status-1"})
	_, err := pool.Exec(context.Background(), `insert into billing.charges (customer_id, source, amount, currency, description, requested_by)
		values ($1, 'adhoc', 1234, 'jpy', 'fee', 'finance'), ($1, 'adhoc', 99, 'usd', 'fee', 'finance')`, c.ID)
	require.NoError(t, err)
	_, err = pool.Exec(context.Background(), `select billing.create_installment_plan('status-1', 'Sofa', 900, 'usd', 3, anchor_day => 1, starts_at => now())`)
	require.NoError(t, err)
	_, err = pool.Exec(context.Background(), `update billing.installment_plans set next_due_at = now() - interval '61 minutes'`)
	require.NoError(t, err)
	var out bytes.Buffer
	require.NoError(t, run(context.Background(), []string{"status"}, envOf(map[string]string{"DATABASE_URL": dbURL}), &out, &bytes.Buffer{}))
	require.Regexp(t, `pending\s+jpy\s+1\s+1234`, out.String())
	require.Regexp(t, `pending\s+usd\s+1\s+99`, out.String())
	require.Contains(t, out.String(), "Job queues")
	require.Regexp(t, `installation [0-9a-f-]{36}\n`, out.String())
	require.Regexp(t, `installment plans\s+1\s+1\s+1h1m`, out.String(), "one plan due for 61 minutes: the due computation is not running")
}
