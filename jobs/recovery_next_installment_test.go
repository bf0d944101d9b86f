package jobs_test

import (
	"context"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/worker"
)

// The whole recovery loop with the real jobs: an installment declines off-session (a card that
// saves but always fails), the customer pays the recovery page with pm_card_visa, the webhook
// marks the charge recovered and the card that paid becomes the default, and the next
// installment is then charged off-session on that new card.
func TestRecoveredCardChargesTheNextInstallment(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	hooks := httptest.NewServer(worker.NewWebhooks(e.Pool, e.Client, e.Config.StripeWebhookSecret, e.Logger))
	t.Cleanup(hooks.Close)
	e.Fake.SetWebhook(hooks.URL, e.Config.StripeWebhookSecret)
	ctx := context.Background()

	c := e.customer("ida", "pm_card_chargeCustomerFail")
	oldPM := scalar[string](t, e.Pool, `select stripe_payment_method_id from billing.payment_methods where id = $1`, c.PaymentMethodID)
	var planID int64
	require.NoError(t, e.Pool.QueryRow(ctx, `select billing.create_installment_plan('ida', 'Piano', 90000, 'usd', 3,
		anchor_day => extract(day from now())::int, starts_at => now())`).Scan(&planID))
	e.start() // the due job runs on start: installment 1 is due now

	first := waitValue(t, 10*time.Second, func() (int64, bool) {
		id, err := scalarErr[int64](e.Pool, `select id from billing.charges where source = 'installment' and source_id = $1 and period = '1'`, planID)
		return id, err == nil
	})
	csID := waitValue(t, 20*time.Second, func() (string, bool) {
		id, err := scalarErr[string](e.Pool, `select checkout_session_id from billing.recovery_sessions where charge_id = $1 and status = 'open'`, first)
		return id, err == nil
	})
	require.Contains(t, []string{"retry_scheduled", "recovering"}, e.chargeState(first).Status)

	require.NoError(t, e.Fake.CompleteCheckoutSession(ctx, csID, "pm_card_visa"))
	newPM := waitValue(t, 20*time.Second, func() (string, bool) {
		pm, err := scalarErr[string](e.Pool, `select pm.stripe_payment_method_id from billing.customers cu
			join billing.payment_methods pm on pm.id = cu.default_payment_method_id where cu.id = $1`, c.ID)
		return pm, err == nil && pm != oldPM && e.chargeState(first).Status == "recovered"
	})

	// The next installment falls due: the due job charges it, on the card that paid. The due job
	// that ran at start may not be marked completed yet (River completes jobs in batches), and a
	// due job is unique while one waits or runs: wait for it, or the insert below would be
	// skipped and the installment left to the next minute's tick.
	waitValue(t, 10*time.Second, func() (int, bool) {
		n, err := scalarErr[int](e.Pool, `select count(*) from river_job where kind = 'due'
			and state in ('available', 'pending', 'running', 'scheduled', 'retryable')`)
		return n, err == nil && n == 0
	})
	_, err := e.Pool.Exec(ctx, `update billing.installment_plans set next_due_at = now() where id = $1`, planID)
	require.NoError(t, err)
	res, err := e.Client.Insert(ctx, jobs.DueArgs{}, nil)
	require.NoError(t, err)
	require.False(t, res.UniqueSkippedAsDuplicate, "a due job was still waiting or running")
	second := waitValue(t, 10*time.Second, func() (int64, bool) {
		id, err := scalarErr[int64](e.Pool, `select id from billing.charges where source = 'installment' and source_id = $1 and period = '2'`, planID)
		return id, err == nil && e.chargeState(id).Status == "succeeded"
	})
	pi, ok := e.Fake.PaymentIntent(*e.chargeState(second).PaymentIntent)
	require.True(t, ok)
	require.Equal(t, newPM, pi.PaymentMethod, "the next installment is charged on the card that paid the recovery page")
	require.Equal(t, "succeeded", pi.Status)
	require.EqualValues(t, 30000, pi.Amount)
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(first)))
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(second)))
}

// waitValue polls f until it reports ok, and returns its value.
func waitValue[T any](t *testing.T, timeout time.Duration, f func() (T, bool)) T {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if v, ok := f(); ok {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s", timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// scalarErr is scalar that returns the error (no rows yet) instead of failing the test.
func scalarErr[T any](pool *pgxpool.Pool, sql string, args ...any) (T, error) {
	var v T
	err := pool.QueryRow(context.Background(), sql, args...).Scan(&v)
	return v, err
}
