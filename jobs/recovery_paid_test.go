package jobs_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/jobs"
)

// paidBundle is a database with an insert-only River client: RecoveryPaidTx's jobs are
// inserted and inspected, not run.
type paidBundle struct {
	pool   *pgxpool.Pool
	client *river.Client[pgx.Tx]
	cust   dbtest.Customer
}

func setupPaid(t *testing.T) *paidBundle {
	t.Helper()
	pool := dbtest.NewPool(t)
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	require.NoError(t, err)
	return &paidBundle{pool: pool, client: client, cust: dbtest.NewCustomer(t, pool, dbtest.CustomerOpts{Ref: "paid"})}
}

// recoverySession records an open recovery session of the charge, as notify_recovery does.
func recoverySession(t *testing.T, pool *pgxpool.Pool, chargeID int64, id string) {
	t.Helper()
	_, err := pool.Exec(context.Background(), `
		insert into billing.recovery_sessions (charge_id, round, seq, checkout_session_id, url, expires_at, idempotency_key)
		values ($1, 1, 1, $2, 'https://checkout.example.test/' || $2, now() + interval '23 hours', 'key-' || $2)`, chargeID, id)
	require.NoError(t, err)
}

// paidSession is the checkout.session.completed object of a paid recovery session.
func paidSession(id string, chargeID, amount int64, currency string, pi *stripe.PaymentIntent) *stripe.CheckoutSession {
	return &stripe.CheckoutSession{
		ID: id, Mode: stripe.CheckoutSessionModePayment, Status: stripe.CheckoutSessionStatusComplete,
		PaymentStatus: stripe.CheckoutSessionPaymentStatusPaid, AmountTotal: amount, Currency: stripe.Currency(currency),
		Metadata: map[string]string{"charge_id": strconv.FormatInt(chargeID, 10)}, PaymentIntent: pi,
		ExpiresAt: time.Now().Add(time.Hour).Unix(),
	}
}

func (b *paidBundle) pay(t *testing.T, cs *stripe.CheckoutSession) (bool, error) {
	t.Helper()
	ctx := context.Background()
	tx, err := b.pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	known, err := jobs.RecoveryPaidTx(ctx, tx, b.client, cs)
	if err == nil {
		require.NoError(t, tx.Commit(ctx))
	}
	return known, err
}

func TestRecoveryPaidMarksRecoveredAndAdoptsCard(t *testing.T) {
	t.Parallel()
	b := setupPaid(t)
	charge := newCharge(t, b.pool, b.cust.ID, 5000, "jpy", "Installment 2 of 6", "retry_scheduled")
	openRecovery(t, b.pool, charge)
	recoverySession(t, b.pool, charge, "cs_test_paid1")
	pi := &stripe.PaymentIntent{ID: "pi_recovery1", PaymentMethod: &stripe.PaymentMethod{
		ID: "pm_newcard1", Type: stripe.PaymentMethodTypeCard,
		Card: &stripe.PaymentMethodCard{Brand: "mastercard", Last4: "4444", ExpMonth: 3, ExpYear: 2031, Fingerprint: "fpNEW"},
	}}

	known, err := b.pay(t, paidSession("cs_test_paid1", charge, 5000, "jpy", pi))
	require.NoError(t, err)
	require.True(t, known)

	require.Equal(t, "recovered", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, charge))
	require.True(t, scalar[bool](t, b.pool, `select next_attempt_at is null from billing.charges where id = $1`, charge), "automatic retries stop")
	require.Equal(t, "pi_recovery1", scalar[string](t, b.pool, `select payment_intent_id from billing.charges where id = $1`, charge))
	require.Equal(t, "paid", scalar[string](t, b.pool, `select status from billing.recoveries where charge_id = $1`, charge))
	require.Equal(t, "completed", scalar[string](t, b.pool, `select status from billing.recovery_sessions where checkout_session_id = 'cs_test_paid1'`))
	require.Equal(t, "pm_newcard1", scalar[string](t, b.pool, `
		select pm.stripe_payment_method_id from billing.customers c join billing.payment_methods pm on pm.id = c.default_payment_method_id
		where c.id = $1`, b.cust.ID), "the card that paid is the new default")
	require.Equal(t, "4444", scalar[string](t, b.pool, `select last4 from billing.payment_methods where stripe_payment_method_id = 'pm_newcard1'`))
	require.Empty(t, jobsOf(t, b.pool, "adopt_payment_method"), "details came with the session: no job")
	require.Empty(t, jobsOf(t, b.pool, "refund_payment"))

	// The same event again changes nothing and refunds nothing.
	known, err = b.pay(t, paidSession("cs_test_paid1", charge, 5000, "jpy", pi))
	require.NoError(t, err)
	require.True(t, known)
	require.Empty(t, jobsOf(t, b.pool, "refund_payment"))
	require.Equal(t, 0, scalar[int](t, b.pool, `select count(*) from billing.refunds`))
}

// Without the payment method's details (the webhook's session names only the PaymentIntent),
// an adopt_payment_method job fetches them after the transaction.
func TestRecoveryPaidWithoutDetailsInsertsAdoptJob(t *testing.T) {
	t.Parallel()
	b := setupPaid(t)
	charge := newCharge(t, b.pool, b.cust.ID, 1099, "usd", "Top-up", "recovering")
	openRecovery(t, b.pool, charge)
	recoverySession(t, b.pool, charge, "cs_test_paid2")
	known, err := b.pay(t, paidSession("cs_test_paid2", charge, 1099, "usd", &stripe.PaymentIntent{ID: "pi_recovery2"}))
	require.NoError(t, err)
	require.True(t, known)
	require.Equal(t, "recovered", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, charge))
	adopt := jobsOf(t, b.pool, "adopt_payment_method")
	require.Len(t, adopt, 1)
	require.JSONEq(t, `{"charge_id":`+strconv.FormatInt(charge, 10)+`,"payment_intent_id":"pi_recovery2"}`, string(adopt[0].EncodedArgs))
	require.Equal(t, b.cust.PaymentMethodID, scalar[int64](t, b.pool, `select default_payment_method_id from billing.customers where id = $1`, b.cust.ID),
		"the default changes only when the job has the details")
}

// A recovery payment for a charge already collected another way (or canceled) is refunded:
// one refund row and one refund_payment job, however often the event arrives.
func TestRecoveryPaidAfterCollectionIsRefunded(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ status, reason string }{
		{"succeeded", "already_collected"},
		{"recovered", "already_collected"},
		{"canceled", "charge_canceled"},
	} {
		t.Run(tc.status, func(t *testing.T) {
			t.Parallel()
			b := setupPaid(t)
			charge := newCharge(t, b.pool, b.cust.ID, 1234, "bhd", "Service", tc.status)
			openRecovery(t, b.pool, charge)
			recoverySession(t, b.pool, charge, "cs_test_late")
			for range 2 {
				known, err := b.pay(t, paidSession("cs_test_late", charge, 1234, "bhd", &stripe.PaymentIntent{ID: "pi_late"}))
				require.NoError(t, err)
				require.True(t, known)
			}
			require.Equal(t, tc.status, scalar[string](t, b.pool, `select status from billing.charges where id = $1`, charge), "the charge keeps its state")
			require.Equal(t, "completed", scalar[string](t, b.pool, `select status from billing.recovery_sessions where checkout_session_id = 'cs_test_late'`))
			require.Equal(t, 1, scalar[int](t, b.pool, `select count(*) from billing.refunds`))
			require.Equal(t, tc.reason, scalar[string](t, b.pool, `select reason from billing.refunds where payment_intent_id = 'pi_late'`))
			require.EqualValues(t, 1234, scalar[int64](t, b.pool, `select amount from billing.refunds where payment_intent_id = 'pi_late'`))
			require.Len(t, jobsOf(t, b.pool, "refund_payment"), 1)
			require.Empty(t, jobsOf(t, b.pool, "adopt_payment_method"))
		})
	}
}

// Sessions that are not billingd's recovery sessions are not known and change nothing; a paid
// amount that differs from the charge is an error.
func TestRecoveryPaidBadInput(t *testing.T) {
	t.Parallel()
	b := setupPaid(t)
	charge := newCharge(t, b.pool, b.cust.ID, 5000, "jpy", "Plan", "recovering")
	openRecovery(t, b.pool, charge)
	recoverySession(t, b.pool, charge, "cs_test_bad")
	noRecovery := newCharge(t, b.pool, b.cust.ID, 5000, "jpy", "Plan", "recovering")

	setup := paidSession("cs_test_bad", charge, 5000, "jpy", &stripe.PaymentIntent{ID: "pi_x"})
	setup.Mode = stripe.CheckoutSessionModeSetup
	noMeta := paidSession("cs_test_bad", charge, 5000, "jpy", &stripe.PaymentIntent{ID: "pi_x"})
	noMeta.Metadata = nil
	for name, cs := range map[string]*stripe.CheckoutSession{
		"setup mode":         setup,
		"no metadata":        noMeta,
		"unknown charge":     paidSession("cs_test_bad", 999999, 5000, "jpy", &stripe.PaymentIntent{ID: "pi_x"}),
		"charge never fails": paidSession("cs_test_other", noRecovery, 5000, "jpy", &stripe.PaymentIntent{ID: "pi_x"}),
	} {
		known, err := b.pay(t, cs)
		require.NoError(t, err, name)
		require.False(t, known, name)
	}
	_, err := b.pay(t, paidSession("cs_test_bad", charge, 500, "jpy", &stripe.PaymentIntent{ID: "pi_x"}))
	require.ErrorContains(t, err, "paid 500 jpy for charge")

	require.Equal(t, "recovering", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, charge))
	require.Equal(t, "open", scalar[string](t, b.pool, `select status from billing.recovery_sessions where checkout_session_id = 'cs_test_bad'`))
	require.Equal(t, 0, scalar[int](t, b.pool, `select count(*) from billing.refunds`))
	require.Equal(t, 0, scalar[int](t, b.pool, `select count(*) from river_job`))
}

// The close trigger: a charge collected by an automatic retry, canceled by finance or written
// off closes its recovery and gets an expire_recovery job per open session, in the same
// transaction; a recovered charge does not (RecoveryPaidTx closes it itself).
func TestChargeSettledExpiresOpenSession(t *testing.T) {
	t.Parallel()
	b := setupPaid(t)
	ctx := context.Background()
	for _, tc := range []struct{ from, to, recovery string }{
		{"processing", "succeeded", "closed"},
		{"recovering", "canceled", "closed"},
		{"recovering", "uncollectible", "uncollectible"},
		{"retry_scheduled", "canceled", "closed"},
	} {
		charge := newCharge(t, b.pool, b.cust.ID, 1000, "eur", "Plan", tc.from)
		openRecovery(t, b.pool, charge)
		sid := "cs_test_trigger_" + strconv.FormatInt(charge, 10)
		recoverySession(t, b.pool, charge, sid)
		_, err := b.pool.Exec(ctx, `update billing.charges set status = $2 where id = $1`, charge, tc.to)
		require.NoError(t, err, tc.to)
		require.Equal(t, tc.recovery, scalar[string](t, b.pool, `select status from billing.recoveries where charge_id = $1`, charge))
		require.Equal(t, 1, scalar[int](t, b.pool, `
			select count(*) from river_job where kind = 'expire_recovery' and queue = 'default'
			and args = jsonb_build_object('charge_id', $1::bigint, 'checkout_session_id', $2::text)`, charge, sid), tc.to)
	}
	before := len(jobsOf(t, b.pool, "expire_recovery"))
	charge := newCharge(t, b.pool, b.cust.ID, 1000, "eur", "Plan", "recovering")
	openRecovery(t, b.pool, charge)
	_, err := b.pool.Exec(ctx, `update billing.charges set status = 'canceled' where id = $1`, charge)
	require.NoError(t, err)
	require.Len(t, jobsOf(t, b.pool, "expire_recovery"), before, "no open session: no job")
	require.Equal(t, "closed", scalar[string](t, b.pool, `select status from billing.recoveries where charge_id = $1`, charge))
}
