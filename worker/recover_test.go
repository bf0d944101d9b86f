package worker_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/stripefake"
	"github.com/billingd/billingd/worker"
)

// The daemon serves recovery links: a 303 to the open session, plain pages otherwise, each with
// headers that keep the token out of caches and Referer headers.
func TestDaemonServesRecoveryLinks(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := dbtest.NewPool(t)
	fake := stripefake.New()
	t.Cleanup(fake.Close)
	fakeSrv := httptest.NewServer(fake)
	t.Cleanup(fakeSrv.Close)

	cfg := &config.Config{}
	require.NoError(t, config.NewFlagSet("test", cfg, func(string) string { return "" }).Parse(nil))
	cfg.StripeWebhookSecret = secret
	cfg.StripeSecretKey = "sk_test_links"
	cfg.StripeAPIBase = fakeSrv.URL
	cfg.FetchCooldown = 5 * time.Millisecond
	d, err := worker.New(cfg, pool, slog.New(slog.NewTextHandler(io.Discard, nil)))
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(runCtx, ln) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	base := "http://" + ln.Addr().String()

	sc := stripeapi.NewClient(cfg.StripeSecretKey, fakeSrv.URL, nil, 0)
	installation, err := jobs.LoadInstallation(ctx, pool)
	require.NoError(t, err)
	cus, err := sc.V1Customers.Create(ctx, stripeapi.CustomerCreate(installation, "kim", "kim@example.com"))
	require.NoError(t, err)
	pm, err := fake.AttachTestCard(cus.ID, "pm_card_chargeCustomerFail")
	require.NoError(t, err)
	cust := dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "kim", StripeCustomerID: cus.ID, PaymentMethodID: pm})

	// A charge that failed: recovery starts, the daemon's notify_recovery job opens the session.
	openCharge := func(description string) (chargeID int64, token, url string) {
		t.Helper()
		require.NoError(t, pool.QueryRow(ctx, `insert into billing.charges (customer_id, source, amount, currency, description, status, requested_by)
			values ($1, 'adhoc', 5000, 'jpy', $2, 'recovering', 'test') returning id`, cust.ID, description).Scan(&chargeID))
		tx, err := pool.Begin(ctx)
		require.NoError(t, err)
		_, err = jobs.StartRecoveryTx(ctx, tx, d.River(), chargeID, "card_declined")
		require.NoError(t, err)
		require.NoError(t, tx.Commit(ctx))
		require.Eventually(t, func() bool {
			return pool.QueryRow(ctx, `select url from billing.recovery_sessions where charge_id = $1`, chargeID).Scan(&url) == nil
		}, 20*time.Second, 20*time.Millisecond)
		require.NoError(t, pool.QueryRow(ctx, `select token from billing.recoveries where charge_id = $1`, chargeID).Scan(&token))
		return chargeID, token, url
	}
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	get := func(path string) (*http.Response, string) {
		t.Helper()
		resp, err := noRedirect.Get(base + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		require.Equal(t, "no-store", resp.Header.Get("Cache-Control"), path)
		require.Equal(t, "no-referrer", resp.Header.Get("Referrer-Policy"), path)
		return resp, string(b)
	}

	charge, token, url := openCharge("Plan")
	resp, _ := get("/recover/" + token)
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.Equal(t, url, resp.Header.Get("Location"))
	require.True(t, strings.HasPrefix(url, fakeSrv.URL), "Stripe's hosted page")

	for _, path := range []string{"/recover/" + strings.Repeat("A", 43), "/recover/" + token[:40], "/recover/%3Cscript%3E"} {
		resp, body := get(path)
		require.Equal(t, http.StatusNotFound, resp.StatusCode, path)
		require.Equal(t, "text/html; charset=utf-8", resp.Header.Get("Content-Type"))
		require.Contains(t, body, "This link is not valid")
		require.NotContains(t, body, "<script>")
	}

	resp, body := get("/recover/done")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "Your payment was received")
	resp, body = get("/recover/canceled")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "You left the payment page")

	_, err = pool.Exec(ctx, `update billing.charges set status = 'canceled' where id = $1`, charge)
	require.NoError(t, err)
	resp, body = get("/recover/" + token)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "Nothing to pay")

	paid, paidToken, _ := openCharge("Top-up")
	_, err = pool.Exec(ctx, `update billing.charges set status = 'recovered' where id = $1`, paid)
	require.NoError(t, err)
	resp, body = get("/recover/" + paidToken)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "Already paid")

	late, lateToken, _ := openCharge("Fee")
	_, err = pool.Exec(ctx, `update billing.charges set status = 'uncollectible' where id = $1`, late)
	require.NoError(t, err)
	resp, body = get("/recover/" + lateToken)
	require.Equal(t, http.StatusGone, resp.StatusCode)
	require.Contains(t, body, "This link has expired")
}
