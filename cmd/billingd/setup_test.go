package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/stripefake"
)

// TestSetupCommandEndToEnd runs `billingd run` against stripefake and uses `billingd setup` as an
// operator would: the URL is printed, the customer saves a card on the hosted page, Stripe's
// webhook reaches the daemon, and `-wait-completed` returns once the method is saved.
func TestSetupCommandEndToEnd(t *testing.T) {
	t.Parallel()
	dbURL := dbtest.NewDB(t)
	fake := stripefake.New()
	fakeSrv := httptest.NewServer(fake)
	t.Cleanup(func() { fakeSrv.Close(); fake.Close() })
	addr := freeAddr(t)
	env := envOf(map[string]string{
		"DATABASE_URL":           dbURL,
		"STRIPE_SECRET_KEY":      "sk_test_setup_cmd",
		"STRIPE_WEBHOOK_SECRET":  "whsec_setup_cmd",
		"STRIPE_API_BASE":        fakeSrv.URL,
		"BILLING_HTTP_ADDR":      addr,
		"BILLING_PUBLIC_URL":     "http://" + addr,
		"BILLING_FETCH_COOLDOWN": "5ms",
	})
	fake.SetWebhook("http://"+addr+"/webhooks/stripe", "whsec_setup_cmd")

	ctx, cancel := context.WithCancel(context.Background())
	daemon := make(chan error, 1)
	go func() {
		daemon <- run(ctx, []string{"run", "-soft-stop-timeout", "2s"}, env, io.Discard, io.Discard)
	}()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-daemon)
	})

	// Bad input: a clear error naming the problem and its hint; nothing is written.
	var stderr bytes.Buffer
	err := run(ctx, []string{"setup", "-customer-ref", "zed", "-email", "zed@example.com", "-usage", "gifts"}, env, io.Discard, &stderr)
	require.ErrorContains(t, err, "unknown use: gifts")
	require.ErrorContains(t, err, "The uses are")
	pool := dbtest.Pool(t, dbURL)
	var customers int
	require.NoError(t, pool.QueryRow(ctx, `select count(*) from billing.customers`).Scan(&customers))
	require.Zero(t, customers)
	require.ErrorIs(t, run(ctx, []string{"setup", "-email", "zed@example.com", "extra"}, env, io.Discard, io.Discard), errUsage)

	// The URL is printed on stdout; -wait-completed then waits for the customer.
	outR, outW := io.Pipe()
	setupDone := make(chan error, 1)
	go func() {
		setupDone <- run(ctx, []string{"setup", "-customer-ref", "zed", "-email", "zed@example.com", "-usage", "installments,adhoc",
			"-timeout", "30s", "-wait-completed"}, env, outW, io.Discard)
		outW.Close()
	}()
	line, err := bufio.NewReader(outR).ReadString('\n')
	require.NoError(t, err)
	pageURL := strings.TrimSpace(line)
	go func() { _, _ = io.Copy(io.Discard, outR) }()
	var stored string
	require.NoError(t, pool.QueryRow(ctx, `select url from billing.setup_sessions`).Scan(&stored))
	require.Equal(t, stored, pageURL)

	// The customer saves a card and lands on billingd's default success page.
	resp, err := http.PostForm(pageURL, url.Values{"payment_method": {"pm_card_visa"}, "accept_terms": {"on"}})
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "http://"+addr+"/setup/done", resp.Request.URL.String())
	require.Contains(t, string(body), "payment method is being saved")

	select {
	case err := <-setupDone:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("billingd setup -wait-completed did not return")
	}
	var status, last4 string
	require.NoError(t, pool.QueryRow(ctx, `select s.status, p.last4 from billing.setup_sessions s
		join billing.customers c on c.id = s.customer_id join billing.payment_methods p on p.id = c.default_payment_method_id`).Scan(&status, &last4))
	require.Equal(t, "completed", status)
	require.Equal(t, "4242", last4)
}
