package jobs

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stripe/stripe-go/v82"
)

// AdoptPaymentMethodArgs asks for the payment method that paid a recovery session to become the
// customer's default for future off-session charges. It is a job because the method's details
// (brand, last four digits, expiry, fingerprint) come from Stripe, which is not called inside
// the transaction that records the payment.
type AdoptPaymentMethodArgs struct {
	ChargeID        int64  `json:"charge_id"`
	PaymentIntentID string `json:"payment_intent_id"`
}

// Kind is the job kind.
func (AdoptPaymentMethodArgs) Kind() string { return "adopt_payment_method" }

// InsertOpts puts the job on the default queue.
func (AdoptPaymentMethodArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueDefault, MaxAttempts: 25}
}

// adoptPaymentMethodTx makes the payment method of pi the default of customerID when pi carries
// its details (an expanded payment_method), and otherwise inserts an adopt_payment_method job
// that fetches them.
func adoptPaymentMethodTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], chargeID, customerID int64, pi *stripe.PaymentIntent) error {
	if pm := pi.PaymentMethod; pm != nil && pm.Card != nil && pm.ID != "" {
		return savePaymentMethodTx(ctx, tx, customerID, pm)
	}
	if _, err := client.InsertTx(ctx, tx, AdoptPaymentMethodArgs{ChargeID: chargeID, PaymentIntentID: pi.ID}, nil); err != nil {
		return fmt.Errorf("insert adopt_payment_method for charge %d: %w", chargeID, err)
	}
	return nil
}

// adoptPaymentMethodQuery records an attached method for the customer (again attached if it
// had been detached) and returns its row id; a method that belongs to another customer gives
// no row.
const adoptPaymentMethodQuery = `
insert into billing.payment_methods as pm
    (customer_id, stripe_payment_method_id, type, brand, last4, exp_month, exp_year, fingerprint)
values ($1, $2, $3, nullif($4, ''), nullif($5, ''), nullif($6, 0), nullif($7, 0), nullif($8, ''))
on conflict (stripe_payment_method_id) do update
    set status = 'attached', detached_at = null,
        brand = excluded.brand, last4 = excluded.last4, exp_month = excluded.exp_month,
        exp_year = excluded.exp_year, fingerprint = excluded.fingerprint
    where pm.customer_id = excluded.customer_id
returning id`

const setDefaultPaymentMethodQuery = `
update billing.customers set default_payment_method_id = $2, updated_at = now() where id = $1`

// savePaymentMethodTx records pm as the customer's attached default method.
func savePaymentMethodTx(ctx context.Context, tx pgx.Tx, customerID int64, pm *stripe.PaymentMethod) error {
	var brand, last4, fingerprint string
	var expMonth, expYear int64
	if c := pm.Card; c != nil {
		brand, last4, fingerprint, expMonth, expYear = string(c.Brand), c.Last4, c.Fingerprint, c.ExpMonth, c.ExpYear
	}
	typ := string(pm.Type)
	if typ == "" {
		typ = "card"
	}
	var id int64
	err := tx.QueryRow(ctx, adoptPaymentMethodQuery, customerID, pm.ID, typ, brand, last4, expMonth, expYear, fingerprint).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("payment method %s belongs to another customer than %d", pm.ID, customerID)
	}
	if err != nil {
		return fmt.Errorf("record payment method %s: %w", pm.ID, err)
	}
	if _, err := tx.Exec(ctx, setDefaultPaymentMethodQuery, customerID, id); err != nil {
		return fmt.Errorf("make payment method %s the default of customer %d: %w", pm.ID, customerID, err)
	}
	return nil
}

type adoptPaymentMethodWorker struct {
	river.WorkerDefaults[AdoptPaymentMethodArgs]
	d *Deps
}

const adoptCustomerQuery = `
select cu.id, coalesce(cu.stripe_customer_id, '')
from billing.charges c join billing.customers cu on cu.id = c.customer_id
where c.id = $1`

const adoptSetStripeCustomerQuery = `
update billing.customers set stripe_customer_id = $2, updated_at = now()
where id = $1 and stripe_customer_id is null`

// Work reads the PaymentIntent with its payment method from Stripe, attaches the method to the
// customer when Checkout did not (it does when the session names the customer and saves the
// card), and records it as the default, completing the job in the same transaction.
func (w *adoptPaymentMethodWorker) Work(ctx context.Context, job *river.Job[AdoptPaymentMethodArgs]) error {
	var customerID int64
	var stripeCustomer string
	err := w.d.Pool.QueryRow(ctx, adoptCustomerQuery, job.Args.ChargeID).Scan(&customerID, &stripeCustomer)
	if errors.Is(err, pgx.ErrNoRows) {
		return river.JobCancel(fmt.Errorf("charge %d does not exist", job.Args.ChargeID))
	}
	if err != nil {
		return fmt.Errorf("load customer of charge %d: %w", job.Args.ChargeID, err)
	}
	pi, err := retrievePaymentIntent(ctx, w.d, job.Args.PaymentIntentID)
	if err != nil {
		return fmt.Errorf("retrieve %s: %w", job.Args.PaymentIntentID, err)
	}
	pm := pi.PaymentMethod
	if pm == nil || pm.ID == "" {
		return river.JobCancel(fmt.Errorf("%s has no payment method", pi.ID))
	}
	piCustomer := ""
	if pi.Customer != nil {
		piCustomer = pi.Customer.ID
	}
	if stripeCustomer == "" {
		stripeCustomer = piCustomer
	}
	if stripeCustomer == "" {
		return river.JobCancel(fmt.Errorf("customer %d has no Stripe customer to keep %s for", customerID, pm.ID))
	}
	if pm.Customer == nil || pm.Customer.ID != stripeCustomer {
		if pm, err = attachPaymentMethod(ctx, w.d, pm.ID, stripeCustomer); err != nil {
			return fmt.Errorf("attach %s to %s: %w", pi.PaymentMethod.ID, stripeCustomer, err)
		}
	}

	tx, err := w.d.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if _, err := tx.Exec(ctx, adoptSetStripeCustomerQuery, customerID, stripeCustomer); err != nil {
		return fmt.Errorf("record Stripe customer of customer %d: %w", customerID, err)
	}
	if err := savePaymentMethodTx(ctx, tx, customerID, pm); err != nil {
		return err
	}
	if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, job); err != nil {
		return fmt.Errorf("complete adopt_payment_method job: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit payment method %s: %w", pm.ID, err)
	}
	w.d.Logger.Info("recovery payment method is the new default", "charge_id", job.Args.ChargeID,
		"customer_id", customerID, "payment_method", pm.ID, "job_id", job.ID)
	return nil
}
