package main

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/billingd/billingd/internal/stripeapi"
)

func TestRun(t *testing.T) {
	t.Parallel()
	const secret = "whsec_cmd"
	var mu sync.Mutex
	var got []string
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		ev, err := webhook.ConstructEvent(body, r.Header.Get("Stripe-Signature"), secret)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		mu.Lock()
		got = append(got, string(ev.Type))
		mu.Unlock()
	}))
	t.Cleanup(hook.Close)

	ctx, cancel := context.WithCancel(t.Context())
	out, w := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-addr", "127.0.0.1:0", "-webhook-url", hook.URL, "-webhook-secret", secret,
			"-public-url", "http://pay.demo.example:8443"},
			w, slog.New(slog.DiscardHandler))
		_ = w.Close()
	}()
	base, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err)
	base = strings.TrimSpace(base)
	require.True(t, strings.HasPrefix(base, "http://127.0.0.1:"), base)
	go func() { _, _ = io.Copy(io.Discard, out) }()

	sc := stripeapi.NewClient("sk_test_cmd", base, nil, 0)
	c, err := sc.V1Customers.Create(t.Context(), stripeapi.CustomerCreate("5f0c8c1e-3b7a-4d2e-9a41-0c6f2b8e7d19", "ref-cmd", "cmd@example.com"))
	require.NoError(t, err)
	require.Equal(t, "cmd@example.com", c.Email)
	cs, err := sc.V1CheckoutSessions.Create(t.Context(), stripeapi.SetupSession(c.ID, "usd", "https://a.example/ok", "https://a.example/no", nil, ""))
	require.NoError(t, err)
	require.Equal(t, "http://pay.demo.example:8443/c/pay/"+cs.ID, cs.URL)

	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	mu.Lock()
	require.Equal(t, []string{"customer.created"}, got, "only one event exists when the first delivery is awaited")
	mu.Unlock()

	cancel()
	require.NoError(t, <-done)
}

func TestRunRejectsWebhookWithoutSecret(t *testing.T) {
	t.Setenv("STRIPE_WEBHOOK_SECRET", "")
	err := run(t.Context(), []string{"-addr", "127.0.0.1:0", "-webhook-url", "http://127.0.0.1:1/hook"}, io.Discard, slog.New(slog.DiscardHandler))
	require.ErrorContains(t, err, "-webhook-secret")
}
