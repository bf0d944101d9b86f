package jobs_test

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/stripefake"
)

// buildBillingd builds cmd/billingd once per test binary.
var buildBillingd = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "billingd-bin-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "billingd")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/billingd/billingd/cmd/billingd").CombinedOutput()
	if err != nil {
		return "", &exec.ExitError{Stderr: out}
	}
	return bin, nil
})

// daemon is a `billingd run` subprocess.
type daemon struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	done   chan error
}

// startDaemon runs `billingd run` against the env's database and stripefake.
func (e *env) startDaemon(bin string, extra ...string) *daemon {
	e.t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(e.t, err)
	addr := l.Addr().String()
	require.NoError(e.t, l.Close())
	d := &daemon{stderr: &bytes.Buffer{}, done: make(chan error, 1)}
	d.cmd = exec.Command(bin, "run")
	d.cmd.Env = append(os.Environ(),
		"DATABASE_URL="+e.DBURL,
		"STRIPE_SECRET_KEY=sk_test_billingd",
		"STRIPE_WEBHOOK_SECRET=whsec_test",
		"STRIPE_API_BASE="+e.FakeURL,
		"BILLING_HTTP_ADDR="+addr,
		"BILLING_MAX_WORKERS=20",
		"BILLING_FETCH_COOLDOWN=5ms",
		"BILLING_STRIPE_RPS=10000",
		"BILLING_CHARGE_BACKOFF=50ms",
		"BILLING_RECONCILE_SCHEDULE=@every 1s",
		"BILLING_RECONCILE_AFTER=2s",
		"BILLING_LOG_LEVEL=warn",
	)
	d.cmd.Env = append(d.cmd.Env, extra...)
	d.cmd.Stderr = d.stderr
	require.NoError(e.t, d.cmd.Start())
	go func() { d.done <- d.cmd.Wait() }()
	e.t.Cleanup(func() {
		_ = d.cmd.Process.Kill()
		<-d.done
		if e.t.Failed() {
			lines := strings.Split(strings.TrimSpace(d.stderr.String()), "\n")
			e.t.Logf("billingd stderr (last lines):\n%s", strings.Join(lines[max(0, len(lines)-20):], "\n"))
		}
	})
	return d
}

// kill sends SIGKILL: no soft stop, no deferred cleanup, connections cut mid-request.
func (d *daemon) kill(t testing.TB) {
	t.Helper()
	require.NoError(t, d.cmd.Process.Signal(syscall.SIGKILL))
	err := <-d.done
	d.done <- err // for the cleanup
	var exit *exec.ExitError
	require.ErrorAs(t, err, &exit)
	require.Equal(t, "signal: killed", exit.Error())
}

// countStatus counts charges by status.
func (e *env) countStatus() map[string]int {
	e.t.Helper()
	rows, err := e.Pool.Query(context.Background(), `select status, count(*) from billing.charges group by status`)
	require.NoError(e.t, err)
	out := map[string]int{}
	for rows.Next() {
		var s string
		var n int
		require.NoError(e.t, rows.Scan(&s, &n))
		out[s] = n
	}
	require.NoError(e.t, rows.Err())
	return out
}

// The daemon is killed (SIGKILL, not a context cancel) twice in the middle of charging, with
// requests in flight, and started again: the end state is the same as without the kills.
func TestChargeSurvivesKill(t *testing.T) {
	t.Parallel()
	bin, err := buildBillingd()
	require.NoError(t, err, "go build ./cmd/billingd")
	n := sized(t, "BILLINGD_KILL_CHARGES", 1000, 400)
	e := newEnv(t, envOpts{NoRiver: true})
	p := e.makePopulation(n, 99)
	e.injectFaults()
	// Every create is slow enough that a kill always finds requests in flight.
	e.Fake.SetFaultRate(stripefake.KindCreatePaymentIntent, stripefake.Fault{Latency: 30 * time.Millisecond}, 1)

	ctx := context.Background()
	inFlightAtKill := 0
	for round := 1; round <= 2; round++ {
		d := e.startDaemon(bin)
		target := round * n / 4
		require.Eventually(t, func() bool { return e.countStatus()["succeeded"] >= target }, 60*time.Second, 10*time.Millisecond,
			"round %d: %d charges succeed", round, target)
		d.kill(t)
		var open int
		require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from billing.charge_attempts where outcome = 'in_flight'`).Scan(&open))
		inFlightAtKill += open
		t.Logf("round %d: killed with %d attempts in flight, charges %v", round, open, e.countStatus())
	}
	require.Positive(t, inFlightAtKill, "the kills hit charges in the middle of their call to Stripe")

	d := e.startDaemon(bin)
	states := e.waitSettled(p.ids, 90*time.Second)
	e.checkExactlyOnce(p, states)
	require.NoError(t, d.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-d.done:
		d.done <- err
		require.NoError(t, err, "a graceful stop after SIGTERM")
	case <-time.After(40 * time.Second):
		t.Fatal("billingd did not stop after SIGTERM")
	}
	var byReconcile int
	require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from billing.charge_attempts where settled_by = 'reconcile'`).Scan(&byReconcile))
	t.Logf("settled by reconcile: %d of %d", byReconcile, n)
}
