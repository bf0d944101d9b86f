package dbtest

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
)

// CustomerOpts describes a customer fixture. Zero values give a customer with Stripe customer
// cus_<ref>, an attached default card pm_fixture_<ref>, and a consent for every use. Tests that
// charge through stripefake pass the ids that stripefake returned when they created the customer
// and attached a test card, since Stripe attaches a payment method to one customer only.
type CustomerOpts struct {
	Ref              string   // customer_ref; required
	StripeCustomerID string   // default "cus_" + Ref
	PaymentMethodID  string   // Stripe id of the default method; default "pm_fixture_" + Ref; "-" for none
	Usage            []string // consent usage; default all three; empty slice with NoConsent for none
	NoConsent        bool
}

// Customer is what the Customer fixture created.
type Customer struct {
	ID              int64
	Ref             string
	StripeID        string
	PaymentMethodID int64 // billing.payment_methods.id, 0 when none
}

// NewCustomer inserts a customer with a default payment method and a consent, directly in the
// tables (as ingesting a completed setup session would), for tests of what comes after onboarding.
func NewCustomer(tb testing.TB, pool *pgxpool.Pool, o CustomerOpts) Customer {
	tb.Helper()
	ctx := context.Background()
	if o.Ref == "" {
		tb.Fatal("dbtest.NewCustomer: Ref is required")
	}
	if o.StripeCustomerID == "" {
		o.StripeCustomerID = "cus_" + o.Ref
	}
	if o.PaymentMethodID == "" {
		o.PaymentMethodID = "pm_fixture_" + o.Ref
	}
	if o.Usage == nil {
		o.Usage = []string{"installments", "topups", "adhoc"}
	}
	c := Customer{Ref: o.Ref, StripeID: o.StripeCustomerID}
	if err := pool.QueryRow(ctx, `insert into billing.customers (customer_ref, email, stripe_customer_id)
		values ($1, $1 || '@example.com', $2) returning id`, o.Ref, o.StripeCustomerID).Scan(&c.ID); err != nil {
		tb.Fatalf("dbtest.NewCustomer: %v", err)
	}
	if o.PaymentMethodID != "-" {
		if err := pool.QueryRow(ctx, `insert into billing.payment_methods
			(customer_id, stripe_payment_method_id, brand, last4, exp_month, exp_year, fingerprint)
			values ($1, $2, 'visa', '4242', 12, 2034, $3) returning id`, c.ID, o.PaymentMethodID, "fp_"+o.Ref).Scan(&c.PaymentMethodID); err != nil {
			tb.Fatalf("dbtest.NewCustomer: payment method: %v", err)
		}
		if _, err := pool.Exec(ctx, `update billing.customers set default_payment_method_id = $1 where id = $2`, c.PaymentMethodID, c.ID); err != nil {
			tb.Fatalf("dbtest.NewCustomer: default method: %v", err)
		}
	}
	if !o.NoConsent {
		if _, err := pool.Exec(ctx, `insert into billing.consents
			(customer_id, payment_method_id, usage, terms_version, agreement, timing, amount_basis, cancellation_policy, accepted_at)
			values ($1, nullif($2, 0), $3, 'v1', 'I agree that Example may charge my saved card.', 'monthly installments and top-ups',
			        'the installment amount or the top-up amount', 'cancel at any time before a charge', now())`,
			c.ID, c.PaymentMethodID, o.Usage); err != nil {
			tb.Fatalf("dbtest.NewCustomer: consent: %v", err)
		}
	}
	return c
}
