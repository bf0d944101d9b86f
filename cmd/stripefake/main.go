// Command stripefake serves the Stripe emulator (package stripefake) on its
// own, for trying billingd by hand:
//
//	stripefake -addr 127.0.0.1:12111 -webhook-url http://127.0.0.1:8080/webhooks/stripe -webhook-secret whsec_...
//
// It prints its base URL on stdout; point STRIPE_API_BASE at it and use any
// test-mode key (sk_test_...). Hosted Checkout pages are served under
// /c/pay/{id}; helper routes under /_stripefake/ complete sessions, inject
// faults and report totals (see the package documentation).
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/billingd/billingd/stripefake"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	err := run(ctx, os.Args[1:], os.Stdout, logger)
	stop()
	if err != nil {
		logger.Error("stripefake stopped", "error", err)
		os.Exit(1)
	}
}

// run serves the emulator until ctx ends.
func run(ctx context.Context, args []string, stdout io.Writer, logger *slog.Logger) error {
	fs := flag.NewFlagSet("stripefake", flag.ContinueOnError)
	fs.SetOutput(stdout)
	addr := fs.String("addr", cmp.Or(os.Getenv("STRIPEFAKE_ADDR"), "127.0.0.1:12111"),
		"host:port to listen on; port 0 picks a free one (env STRIPEFAKE_ADDR)")
	hookURL := fs.String("webhook-url", os.Getenv("STRIPEFAKE_WEBHOOK_URL"),
		"URL events are delivered to; empty stores them only (env STRIPEFAKE_WEBHOOK_URL)")
	hookSecret := fs.String("webhook-secret", os.Getenv("STRIPE_WEBHOOK_SECRET"),
		"secret webhooks are signed with, whsec_... (env STRIPE_WEBHOOK_SECRET)")
	rps := fs.Float64("rate-limit", 0, "API requests per second before 429 rate_limit; 0 means no limit (Stripe live mode: 100)")
	seed := fs.Uint64("seed", 1, "seed for probabilistic faults and duplicate deliveries")
	publicURL := fs.String("public-url", os.Getenv("STRIPEFAKE_PUBLIC_URL"),
		"base URL of hosted Checkout pages when browsers reach the emulator by another name than the API clients; default: the Host of each API request (env STRIPEFAKE_PUBLIC_URL)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *hookURL != "" && *hookSecret == "" {
		return errors.New("-webhook-secret (or STRIPE_WEBHOOK_SECRET) is required with -webhook-url")
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *addr, err)
	}
	opts := []stripefake.Option{
		stripefake.WithWebhook(*hookURL, *hookSecret),
		stripefake.WithRateLimit(*rps, int(*rps)),
		stripefake.WithSeed(*seed),
		stripefake.WithLogger(logger),
	}
	if *publicURL != "" {
		opts = append(opts, stripefake.WithBaseURL(*publicURL))
	}
	fake := stripefake.New(opts...)
	defer fake.Close()
	srv := &http.Server{Handler: fake, ReadHeaderTimeout: 10 * time.Second}

	base := baseURL(ln.Addr().(*net.TCPAddr))
	fmt.Fprintln(stdout, base)
	logger.Info("stripefake listening", "url", base, "webhook_url", *hookURL)

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shut down: %w", err)
	}
	return nil
}

// baseURL is the URL clients use; a wildcard address is reached on loopback.
func baseURL(a *net.TCPAddr) string {
	host := a.IP.String()
	if a.IP.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, fmt.Sprint(a.Port))
}
