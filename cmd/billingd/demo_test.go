package main

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/jobs"
)

// testLogger sends the daemon's logs to the test log, shown when a test fails.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// TestDemoWithoutCreateDB uses the DATABASE_URL database itself when the role may not create
// one, but only when nothing in it could be worked by the demo's daemon.
func TestDemoWithoutCreateDB(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	server := dbtest.ServerURL(t)
	role := "billingd_demo_nocreatedb_" + randomHex(4)
	admin, err := pgx.Connect(ctx, server)
	require.NoError(t, err)
	defer admin.Close(ctx)
	_, err = admin.Exec(ctx, "create role "+pgx.Identifier{role}.Sanitize()+" login nocreatedb")
	require.NoError(t, err)

	empty := dbtest.NewEmptyDB(t, server)
	busy := dbtest.NewDB(t)
	busyPool := dbtest.Pool(t, busy)
	dbtest.NewCustomer(t, busyPool, dbtest.CustomerOpts{Ref: "someone-real"})
	// The role may read what the demo inspects, so that it is refused for the data, not for
	// lack of rights.
	_, err = busyPool.Exec(ctx, "grant usage on schema billing to "+pgx.Identifier{role}.Sanitize()+
		"; grant select on billing.customers, river_job to "+pgx.Identifier{role}.Sanitize())
	require.NoError(t, err)
	busyPool.Close()
	t.Cleanup(func() {
		// The databases are dropped by dbtest's own cleanups, which run after this one.
		_, _ = admin.Exec(context.Background(), "drop owned by "+pgx.Identifier{role}.Sanitize())
		_, _ = admin.Exec(context.Background(), "drop role if exists "+pgx.Identifier{role}.Sanitize())
	})
	as := func(dbURL string) string {
		u, err := url.Parse(dbURL)
		require.NoError(t, err)
		u.User = url.User(role)
		return u.String()
	}

	db, err := provisionDemoDB(ctx, as(empty), &bytes.Buffer{})
	require.NoError(t, err)
	require.Equal(t, as(empty), db.URL, "an empty database is used in place")
	require.Nil(t, db.Cleanup, "nothing to drop: the demo did not create it")
	require.Contains(t, db.About, "no CREATEDB")

	_, err = provisionDemoDB(ctx, as(busy), &bytes.Buffer{})
	require.Error(t, err, "a database with billing data is never used")
	require.Contains(t, err.Error(), "already holds billing customers or River jobs")
}

// TestDemoRefusesStripeKeys: the demo acts as the customer on hosted pages, which only the
// emulator allows; it refuses a live key outright and explains a test key, before anything runs.
func TestDemoRefusesStripeKeys(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ key, want string }{
		{"sk_live_51Hsecretsecret", "live-mode key"},
		{"rk_live_51Hsecretsecret", "live-mode key"},
		{"sk_test_51Hsecretsecret", "only the built-in Stripe emulator allows"},
	} {
		var stdout, stderr bytes.Buffer
		err := run(context.Background(), []string{"demo"}, envOf(map[string]string{"STRIPE_SECRET_KEY": tc.key}), &stdout, &stderr)
		require.Error(t, err, tc.key)
		require.Contains(t, err.Error(), tc.want)
		require.NotContains(t, err.Error(), "secretsecret", "the key is never echoed")
		require.Empty(t, stdout.String(), "refused before anything started")
	}
	require.NoError(t, checkDemoStripeKey(""))
}

// TestDemoStepTimeoutSaysWhatItExpected: a step that does not see what it waits for fails after
// the step timeout with what it expected and what it last saw.
func TestDemoStepTimeoutSaysWhatItExpected(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	p := &progress{out: &out, timeout: 200 * time.Millisecond}
	start := time.Now()
	err := p.step(context.Background(), "wait for Godot", func(ctx context.Context) (string, error) {
		return "", waitFor(ctx, "Godot to arrive", func(context.Context) (bool, string, error) {
			return false, "Vladimir and Estragon are waiting", nil
		})
	})
	require.Error(t, err)
	require.Less(t, time.Since(start), 5*time.Second)
	require.Contains(t, err.Error(), "demo step 1 (wait for Godot) failed: timed out waiting for Godot to arrive; last seen: Vladimir and Estragon are waiting")
	require.Regexp(t, `  1\. wait for Godot +\d\.\d\ds  FAILED\n     timed out waiting for Godot`, out.String())

	// Interrupted (Ctrl-C) is not a timeout.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err = p.step(ctx, "interrupted", func(ctx context.Context) (string, error) {
		return "", waitFor(ctx, "anything", func(context.Context) (bool, string, error) { return false, "", nil })
	})
	require.True(t, errors.Is(err, context.Canceled), "got %v", err)
	require.Contains(t, out.String(), "interrupted\n")
}

func TestAmountIsWrittenAsNotificationsWriteIt(t *testing.T) {
	t.Parallel()
	require.Equal(t, "$150.00", amount(15000, "usd"))
	require.Equal(t, "¥12,000", amount(12000, "jpy"))
	require.Equal(t, "7 XXX", amount(7, "xxx"), "an unknown currency is still shown")
}

func TestInstallAdvice(t *testing.T) {
	t.Parallel()
	has := func(bins ...string) func(string) (string, error) {
		return func(name string) (string, error) {
			for _, b := range bins {
				if b == name {
					return "/usr/bin/" + b, nil
				}
			}
			return "", errors.New("not found")
		}
	}
	require.Contains(t, installAdvice(has("apt-get", "brew")), "apt-get install -y postgresql")
	require.Contains(t, installAdvice(has("dnf")), "dnf install -y postgresql-server")
	require.Equal(t, "brew install postgresql", installAdvice(has("brew")))
	require.Contains(t, installAdvice(has()), "set DATABASE_URL")
}

func TestLogTailKeepsTheLastLines(t *testing.T) {
	t.Parallel()
	tail := newLogTail(2)
	_, _ = tail.Write([]byte("one\ntwo\nthr"))
	_, _ = tail.Write([]byte("ee\nfour"))
	var out bytes.Buffer
	tail.dump(&out)
	require.Equal(t, "\nthe daemon's last 2 log lines (run with -v to see them all):\n  two\n  three\n\n", out.String())
}

// TestDemoAppChecksSignatures: the demo's stand-in application accepts only notifications signed
// with its secret, as the README tells an application to.
func TestDemoAppChecksSignatures(t *testing.T) {
	t.Parallel()
	app := newDemoApp("demo_notify_secret")
	body := []byte(`{"type":"recovery.payment_required","charge_id":7,"url":"http://x/recover/t"}`)
	post := func(secret string) int {
		req := httptest.NewRequest(http.MethodPost, "/billing/notifications", bytes.NewReader(body))
		req.Header.Set(jobs.SignatureHeader, jobs.SignNotification(secret, time.Now(), body))
		rec := httptest.NewRecorder()
		app.ServeHTTP(rec, req)
		return rec.Code
	}

	require.Equal(t, http.StatusUnauthorized, post("another_secret"))
	_, ok, rejected := app.notice("recovery.payment_required", 7)
	require.False(t, ok)
	require.Len(t, rejected, 1)

	require.Equal(t, http.StatusNoContent, post("demo_notify_secret"))
	n, ok, _ := app.notice("recovery.payment_required", 7)
	require.True(t, ok)
	require.Equal(t, "http://x/recover/t", n.URL)
}
