package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/billingd/billingd/internal/config"
)

// setupNotification is the payload of NOTIFY billing_setup (see schema/migrations/00400_webhooks.sql).
type setupNotification struct {
	SetupSessionID int64     `json:"setup_session_id"`
	CustomerRef    string    `json:"customer_ref"`
	Status         string    `json:"status"`
	URL            string    `json:"url"`
	ExpiresAt      time.Time `json:"expires_at"`
	Error          string    `json:"error"`
}

// setupArgs are the flags of `billingd setup` besides the settings.
type setupArgs struct {
	customerRef, email, usage, terms, currency string
	timeout                                    time.Duration
	waitCompleted                              bool
}

// cmdSetup begins saving a customer's payment method from a terminal, as the application does:
// it calls billing.start_setup, waits on channel billing_setup for the hosted page (created by a
// running `billingd run`), and prints its URL on stdout. With -wait-completed it then waits until
// the customer has saved the method.
func cmdSetup(ctx context.Context, args []string, env config.Env, stdout, stderr io.Writer) error {
	cfg := &config.Config{}
	var a setupArgs
	fs := config.NewFlagSet("setup", cfg, env)
	fs.SetOutput(stderr)
	fs.StringVar(&a.customerRef, "customer-ref", "", "the application's reference of the customer (required)")
	fs.StringVar(&a.email, "email", "", "the customer's email address (required)")
	fs.StringVar(&a.usage, "usage", "installments,topups,adhoc", "what the method may be charged for: installments, topups, adhoc, comma-separated")
	fs.StringVar(&a.terms, "terms-version", "v1", "version of the terms shown to the customer (a row of billing.terms)")
	fs.StringVar(&a.currency, "currency", "usd", "currency of the setup page")
	fs.DurationVar(&a.timeout, "timeout", 2*time.Minute, "how long to wait for the page (and, with -wait-completed, for the customer)")
	fs.BoolVar(&a.waitCompleted, "wait-completed", false, "after printing the URL, wait until the customer has saved the method")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: billingd setup -customer-ref REF -email ADDRESS [flags]\n\n"+
			"Starts a setup session (billing.start_setup) and prints the URL of the Stripe-hosted page\n"+
			"once a running `billingd run` has created it.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "billingd setup: unexpected arguments: %s\n", strings.Join(fs.Args(), " "))
		return errUsage
	}
	if err := cfg.Validate(config.NeedDatabase); err != nil {
		return fmt.Errorf("invalid settings: %s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	pool, err := connect(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()

	// Listen before starting, so that the announcement cannot be missed.
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("acquire connection: %w", err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "listen billing_setup"); err != nil {
		return fmt.Errorf("listen billing_setup: %w", err)
	}

	var id int64
	err = pool.QueryRow(ctx, `select billing.start_setup($1, $2, $3, $4, $5)`, a.customerRef, a.email, a.usage, a.terms, a.currency).Scan(&id)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Hint != "" {
			return fmt.Errorf("%s (%s)", pgErr.Message, pgErr.Hint)
		}
		return fmt.Errorf("start setup: %w", err)
	}
	fmt.Fprintf(stderr, "setup session %d started for %s; waiting for the page (is `billingd run` running?)\n", id, a.customerRef)

	waitCtx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	wantOpen := true
	for {
		n, err := conn.Conn().WaitForNotification(waitCtx)
		if err != nil {
			if errors.Is(waitCtx.Err(), context.DeadlineExceeded) {
				if wantOpen {
					return fmt.Errorf("setup session %d: no page after %s: is `billingd run` running against this database?", id, a.timeout)
				}
				return fmt.Errorf("setup session %d: not completed after %s", id, a.timeout)
			}
			return fmt.Errorf("wait for billing_setup: %w", err)
		}
		var msg setupNotification
		if json.Unmarshal([]byte(n.Payload), &msg) != nil || msg.SetupSessionID != id {
			continue
		}
		switch msg.Status {
		case "open":
			fmt.Fprintln(stdout, msg.URL)
			fmt.Fprintf(stderr, "open the page above to save a payment method; it expires at %s\n", msg.ExpiresAt.Local().Format(time.RFC1123))
			if !a.waitCompleted {
				return nil
			}
			wantOpen = false
		case "completed":
			fmt.Fprintf(stderr, "setup session %d completed: the payment method is saved\n", id)
			return nil
		case "failed":
			return fmt.Errorf("setup session %d failed: %s", id, msg.Error)
		case "expired":
			return fmt.Errorf("setup session %d expired before the customer completed it", id)
		}
	}
}
