package jobs_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/stripefake"
)

func itoa(id int64) string { return strconv.FormatInt(id, 10) }

func TestChargeHappyPath(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	c := e.customer("happy", "pm_card_visa")
	id := e.charge(c, 1999, "eur")
	e.start()
	st := e.waitSettled([]int64{id}, 20*time.Second)[id]

	require.Equal(t, "succeeded", st.Status)
	require.Equal(t, "collected by attempt 1", st.Reason)
	require.Equal(t, 1, st.AttemptCount)
	require.NotNil(t, st.PaymentIntent)

	as := e.attempts(id)
	require.Len(t, as, 1)
	a := as[0]
	require.Equal(t, 1, a.No)
	require.Equal(t, "billingd-"+e.installation()+"-charge-"+itoa(id)+"-attempt-1", a.Key)
	require.Equal(t, jobs.IdempotencyKey(e.installation(), id, 1), a.Key)
	require.Equal(t, "succeeded", a.Outcome)
	require.Equal(t, 1, a.Tries)
	require.Equal(t, 200, *a.HTTPStatus)
	require.Equal(t, *st.PaymentIntent, *a.PI)
	require.Equal(t, "succeeded", *a.PIStatus)
	require.NotEmpty(t, *a.RequestID)
	require.Equal(t, "job", *a.SettledBy)
	require.NotNil(t, a.FinishedAt)
	require.NotNil(t, a.DurationMS)

	pi, ok := e.Fake.PaymentIntent(*a.PI)
	require.True(t, ok)
	require.Equal(t, int64(1999), pi.Amount)
	require.Equal(t, "eur", pi.Currency)
	require.Equal(t, c.StripeID, pi.Customer)
	require.Equal(t, "Top-up 1 for happy", pi.Description)
	require.Equal(t, map[string]string{"charge_id": itoa(id), "source": "adhoc", "charge_attempt": "1",
		"billingd_installation": e.installation()}, pi.Metadata)
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
	require.Equal(t, int64(1999), e.Fake.Totals()["eur"].Collected)
	require.Equal(t, []string{a.Key}, e.Front.createKeys())
	body := e.Front.createBodies()[0]
	for k, v := range map[string]string{"off_session": "true", "confirm": "true", "customer": c.StripeID,
		"payment_method": pi.PaymentMethod, "amount": "1999", "currency": "eur"} {
		require.Equal(t, v, body.Get(k), k)
	}
}

func TestChargeZeroDecimalCurrency(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	id := e.charge(e.customer("yen", "pm_card_visa"), 5000, "jpy")
	e.start()
	require.Equal(t, "succeeded", e.waitSettled([]int64{id}, 20*time.Second)[id].Status)
	require.Equal(t, int64(5000), e.Fake.Totals()["jpy"].Collected, "¥5000 is 5000 in Stripe's minor unit, not 500000")
}

// Each of Stripe's test cards, through the whole job: what the charge becomes, what the attempt
// keeps, what Stripe collected, and whether a retry and a recovery follow.
func TestChargeTestCards(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	const day = 24 * time.Hour
	cards := []struct {
		pm          string
		status      string
		declineCode string // "" for a success
		retryIn     time.Duration
	}{
		{"pm_card_visa", "succeeded", "", 0},
		{"pm_card_mastercard", "succeeded", "", 0},
		{"pm_card_amex", "succeeded", "", 0},
		{"pm_card_chargeDeclined", "retry_scheduled", "generic_decline", day},
		{"pm_card_chargeDeclinedInsufficientFunds", "retry_scheduled", "insufficient_funds", day},
		{"pm_card_chargeDeclinedProcessingError", "retry_scheduled", "processing_error", time.Hour},
		{"pm_card_chargeCustomerFail", "retry_scheduled", "generic_decline", day},
		{"pm_card_chargeDeclinedLostCard", "recovering", "lost_card", 0},
		{"pm_card_chargeDeclinedStolenCard", "recovering", "stolen_card", 0},
		{"pm_card_chargeDeclinedExpiredCard", "recovering", "expired_card", 0},
		{"pm_card_chargeDeclinedIncorrectCvc", "recovering", "incorrect_cvc", 0},
		{"pm_card_authenticationRequired", "recovering", "authentication_required", 0},
	}
	ids := make([]int64, len(cards))
	for i, tc := range cards {
		ids[i] = e.charge(e.customer("card-"+strconv.Itoa(i), tc.pm), 1000+int64(i), "usd")
	}
	start := time.Now()
	e.start()
	states := e.waitSettled(ids, 30*time.Second)
	ctx := context.Background()
	var want int64
	for i, tc := range cards {
		t.Run(tc.pm, func(t *testing.T) {
			id := ids[i]
			st := states[id]
			require.Equal(t, tc.status, st.Status, st.Reason)
			as := e.attempts(id)
			require.Len(t, as, 1)
			a := as[0]
			require.NotNil(t, a.PI, "the PaymentIntent is kept, declined or not")
			pis := e.Fake.PaymentIntentsByMetadata("charge_id", itoa(id))
			require.Len(t, pis, 1, "one PaymentIntent per attempt")
			require.Equal(t, *a.PI, pis[0].ID)

			var recoveries, notifies, retries int
			require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from billing.recoveries where charge_id = $1 and status = 'open'`, id).Scan(&recoveries))
			require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from river_job where kind = 'notify_recovery' and (args->>'charge_id')::bigint = $1`, id).Scan(&notifies))
			require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from river_job where kind = 'charge' and state = 'scheduled' and (args->>'charge_id')::bigint = $1`, id).Scan(&retries))

			if tc.declineCode == "" {
				require.Equal(t, "succeeded", a.Outcome)
				require.Equal(t, 200, *a.HTTPStatus)
				require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
				require.Zero(t, recoveries)
				require.Zero(t, notifies)
				want += st.Amount
				return
			}
			require.Equal(t, "declined", a.Outcome)
			require.Equal(t, 402, *a.HTTPStatus)
			require.Equal(t, "card_error", *a.ErrorType)
			require.Equal(t, tc.declineCode, *a.DeclineCode)
			require.Equal(t, "requires_payment_method", *a.PIStatus)
			require.Equal(t, 0, e.Fake.SuccessfulCharges(itoa(id)))
			require.Equal(t, 1, recoveries, "every decline opens a recovery")
			require.Equal(t, 1, notifies, "and notifies the customer once")
			require.Contains(t, st.Reason, tc.declineCode)
			if tc.retryIn > 0 {
				require.NotNil(t, st.NextAttemptAt)
				require.WithinDuration(t, start.Add(tc.retryIn), *st.NextAttemptAt, 30*time.Second)
				require.Equal(t, 1, retries, "the retry is a scheduled charge job")
			} else {
				require.Nil(t, st.NextAttemptAt)
				require.Zero(t, retries)
			}
		})
	}
	require.Equal(t, want, e.Fake.Totals()["usd"].Collected)
}

// A charge that fails the checks before any call is not sent; its status and reason say why.
func TestChargeChecksBeforeSending(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	ctx := context.Background()

	noConsent := e.customer("no-consent", "pm_card_visa", dbtest.CustomerOpts{NoConsent: true})
	installmentsOnly := e.customer("inst-only", "pm_card_visa", dbtest.CustomerOpts{Usage: []string{"installments"}})
	revoked := e.customer("revoked", "pm_card_visa")
	_, err := e.Pool.Exec(ctx, `select billing.revoke_consent($1, 'withdrawn by email')`, revoked.Ref)
	require.NoError(t, err)
	noPM := dbtest.NewCustomer(t, e.Pool, dbtest.CustomerOpts{Ref: "no-pm", PaymentMethodID: "-"})
	detached := e.customer("detached", "pm_card_visa")
	_, err = e.Pool.Exec(ctx, `update billing.payment_methods set status = 'detached', detached_at = now() where customer_id = $1`, detached.ID)
	require.NoError(t, err)
	ok := e.customer("ok", "pm_card_visa")

	// An installment whose plan was canceled is no longer due.
	var planID, canceledCharge int64
	require.NoError(t, e.Pool.QueryRow(ctx, `
		insert into billing.installment_plans (customer_id, description, total_amount, currency, installment_count,
		    schedule_kind, anchor_day, starts_at, next_due_at, status)
		values ($1, 'Sofa', 3000, 'eur', 3, 'monthly', 1, now(), null, 'canceled') returning id`, ok.ID).Scan(&planID))
	require.NoError(t, e.Pool.QueryRow(ctx, `
		insert into billing.charges (customer_id, source, source_id, period, amount, currency, description)
		values ($1, 'installment', $2, '1', 1000, 'eur', 'Sofa 1 of 3') returning id`, ok.ID, planID).Scan(&canceledCharge))
	_, err = e.Client.Insert(ctx, jobs.ChargeArgs{ChargeID: canceledCharge}, nil)
	require.NoError(t, err)

	cases := map[int64]struct{ status, reason string }{
		e.charge(noConsent, 500, "eur"):        {"recovering", "no active consent covers adhoc charges"},
		e.charge(installmentsOnly, 500, "eur"): {"recovering", "no active consent covers adhoc charges"},
		e.charge(revoked, 500, "eur"):          {"recovering", "no active consent covers adhoc charges"},
		e.charge(noPM, 500, "eur"):             {"recovering", "the customer has no default payment method"},
		e.charge(detached, 500, "eur"):         {"recovering", "the default payment method is no longer attached"},
		canceledCharge:                         {"canceled", "the installment plan was canceled"},
		e.charge(ok, 500, "eur"):               {"succeeded", "collected by attempt 1"},
	}
	ids := make([]int64, 0, len(cases))
	for id := range cases {
		ids = append(ids, id)
	}
	e.start()
	states := e.waitSettled(ids, 20*time.Second)
	for id, want := range cases {
		require.Equal(t, want.status, states[id].Status, "charge %d", id)
		require.Equal(t, want.reason, states[id].Reason, "charge %d", id)
		if want.status != "succeeded" {
			require.Empty(t, e.attempts(id), "charge %d was not sent", id)
			require.Empty(t, e.Fake.PaymentIntentsByMetadata("charge_id", itoa(id)))
		}
		var recoveries int
		require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from billing.recoveries where charge_id = $1`, id).Scan(&recoveries))
		require.Equal(t, want.status == "recovering", recoveries == 1, "charge %d: recovery lets the customer pay on-session", id)
	}
	require.Len(t, e.Front.createKeys(), 1, "only the good charge reached Stripe")
}

// makeRetryDue moves a scheduled retry to now, as if its calendar step had passed.
func (e *env) makeRetryDue(id int64) {
	e.t.Helper()
	ctx := context.Background()
	_, err := e.Pool.Exec(ctx, `update billing.charges set next_attempt_at = now() where id = $1 and status = 'retry_scheduled'`, id)
	require.NoError(e.t, err)
	tag, err := e.Pool.Exec(ctx, `update river_job set scheduled_at = now() where kind = 'charge' and state = 'scheduled' and (args->>'charge_id')::bigint = $1`, id)
	require.NoError(e.t, err)
	require.EqualValues(e.t, 1, tag.RowsAffected(), "one scheduled retry job")
}

// waitStatus waits until the charge has the status.
func (e *env) waitStatus(id int64, status string, timeout time.Duration) chargeState {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := e.chargeState(id)
		if st.Status == status {
			return st
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("charge %d: status %s (%s), want %s", id, st.Status, st.Reason, status)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A soft decline is retried on the calendar with a new attempt and a new key; when the retry
// succeeds the recovery closes.
func TestChargeRetryAfterSoftDecline(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	ctx := context.Background()
	c := e.customer("soft", "pm_card_chargeDeclinedInsufficientFunds")
	id := e.charge(c, 4200, "gbp")
	e.start()
	e.waitStatus(id, "retry_scheduled", 20*time.Second)

	// Still short of funds: the second attempt declines too, and the calendar moves on.
	e.makeRetryDue(id)
	require.Eventually(t, func() bool { return len(e.attempts(id)) == 2 && e.attempts(id)[1].Outcome == "declined" }, 20*time.Second, 20*time.Millisecond)
	st := e.waitStatus(id, "retry_scheduled", 5*time.Second)
	require.WithinDuration(t, time.Now().Add(48*time.Hour), *st.NextAttemptAt, time.Minute, "second calendar step")

	// The customer adds funds (here: a working card becomes the default).
	pm, err := e.Fake.AttachTestCard(c.StripeID, "pm_card_visa")
	require.NoError(t, err)
	_, err = e.Pool.Exec(ctx, `
		with pm as (insert into billing.payment_methods (customer_id, stripe_payment_method_id, fingerprint)
		            values ($1, $2, 'fp_new') returning id)
		update billing.customers set default_payment_method_id = (select id from pm) where id = $1`, c.ID, pm)
	require.NoError(t, err)
	e.makeRetryDue(id)
	st = e.waitStatus(id, "succeeded", 20*time.Second)
	require.Equal(t, "collected by attempt 3", st.Reason)

	as := e.attempts(id)
	require.Len(t, as, 3)
	keys := []string{as[0].Key, as[1].Key, as[2].Key}
	require.Equal(t, []string{jobs.IdempotencyKey(e.installation(), id, 1), jobs.IdempotencyKey(e.installation(), id, 2), jobs.IdempotencyKey(e.installation(), id, 3)}, keys, "a new key per attempt")
	require.Equal(t, keys, e.Front.createKeys())
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
	var recovery string
	require.NoError(t, e.Pool.QueryRow(ctx, `select status from billing.recoveries where charge_id = $1`, id).Scan(&recovery))
	require.Equal(t, "closed", recovery, "collected by the retry: the recovery link is closed")
}

// A charge paid through its recovery page is never charged by the scheduled retry.
func TestChargeRetryNeverChargesARecoveredCharge(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	id := e.charge(e.customer("paid-on-page", "pm_card_chargeDeclinedInsufficientFunds"), 990, "eur")
	e.start()
	e.waitStatus(id, "retry_scheduled", 20*time.Second)
	// What RecoveryPaidTx does to the charge when the customer pays the recovery page.
	_, err := e.Pool.Exec(context.Background(), `update billing.charges set status = 'recovered', status_reason = 'paid on the recovery page' where id = $1`, id)
	require.NoError(t, err)
	e.makeRetryDue(id)
	require.Eventually(t, func() bool {
		var n int
		require.NoError(t, e.Pool.QueryRow(context.Background(),
			`select count(*) from river_job where kind = 'charge' and state = 'completed' and (args->>'charge_id')::bigint = $1`, id).Scan(&n))
		return n == 2
	}, 20*time.Second, 20*time.Millisecond, "the retry job ran")
	require.Len(t, e.attempts(id), 1, "no second attempt")
	require.Len(t, e.Front.createKeys(), 1, "nothing more sent to Stripe")
	require.Equal(t, "recovered", e.chargeState(id).Status)
}

// The same charge job twice at once (a duplicate insert, a rescued job) sends one attempt.
func TestChargeJobTwiceSendsOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	ctx := context.Background()
	ids := e.charges([]dbtest.Customer{e.customer("twice", "pm_card_visa")}, []int64{700}, "usd")
	for range 3 {
		_, err := e.Client.Insert(ctx, jobs.ChargeArgs{ChargeID: ids[0]}, nil)
		require.NoError(t, err)
	}
	e.start()
	require.Equal(t, "succeeded", e.waitSettled(ids, 20*time.Second)[ids[0]].Status)
	require.Eventually(t, func() bool {
		var n int
		require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from river_job where kind = 'charge' and state = 'completed'`).Scan(&n))
		return n == 4
	}, 10*time.Second, 20*time.Millisecond)
	require.Len(t, e.attempts(ids[0]), 1)
	require.Len(t, e.Front.createKeys(), 1)
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(ids[0])))
}

// A 429 is a River retry of the same attempt with the same key.
func TestChargeTransientFailureReusesTheKey(t *testing.T) {
	t.Parallel()
	// Reconcile is kept away: on a slow machine it would find the attempt in flight for more
	// than its 1s and replay the key itself, an extra try that this test does not count.
	e := newEnv(t, envOpts{Flags: []string{"-reconcile-after", "1h", "-reconcile-schedule", "0 0 1 1 *"}})
	id := e.charge(e.customer("busy", "pm_card_visa"), 1234, "usd")
	e.Front.next429(2)
	e.start()
	require.Equal(t, "succeeded", e.waitSettled([]int64{id}, 20*time.Second)[id].Status)
	as := e.attempts(id)
	require.Len(t, as, 1, "no new attempt for a transient failure")
	require.Equal(t, 3, as[0].Tries)
	require.Equal(t, []string{as[0].Key}, e.Front.createKeys(), "the one request that got through carried the attempt's key")
	require.EqualValues(t, 2, e.Front.tooMany.Load())
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
}

// A JSON 500 that Stripe stores under the key is not replayed in vain: the attempt's outcome
// is unknown until reconcile finds the PaymentIntent by metadata.
func TestChargeStored500IsSettledByReconcile(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	id := e.charge(e.customer("five-hundred", "pm_card_visa"), 2500, "usd")
	e.Fake.InjectFaults(stripefake.KindCreatePaymentIntent, 1, stripefake.Fault{Kind: stripefake.Fault500After})
	e.start()
	st := e.waitStatus(id, "succeeded", 20*time.Second)
	require.Equal(t, "collected by attempt 1", st.Reason)
	as := e.attempts(id)
	require.Len(t, as, 1)
	require.Equal(t, "reconcile", *as[0].SettledBy)
	require.Equal(t, 500, *as[0].HTTPStatus, "the last HTTP answer is kept")
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
	require.Equal(t, int64(2500), e.Fake.Totals()["usd"].Collected)
}

// A connection dropped after Stripe did the work is retried by stripe-go with the same key,
// which replays the stored result.
func TestChargeDroppedConnectionReplaysTheResult(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	id := e.charge(e.customer("dropped", "pm_card_visa"), 800, "usd")
	e.Fake.InjectFaults(stripefake.KindCreatePaymentIntent, 1, stripefake.Fault{Kind: stripefake.FaultDropAfter})
	e.start()
	require.Equal(t, "succeeded", e.waitSettled([]int64{id}, 20*time.Second)[id].Status)
	keys := e.Front.createKeys()
	require.Len(t, keys, 2)
	require.Equal(t, keys[0], keys[1])
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
}

// The River client of the env, for tests that call contract functions directly.
func (e *env) inTx(fn func(tx pgx.Tx)) {
	e.t.Helper()
	ctx := context.Background()
	tx, err := e.Pool.Begin(ctx)
	require.NoError(e.t, err)
	defer tx.Rollback(ctx) //nolint:errcheck
	fn(tx)
	require.NoError(e.t, tx.Commit(ctx))
}

// With BILLING_STRIPE_CUSTOMER_MODEL=account the PaymentIntent names the customer-configured
// Account (customer_account) instead of a Customer. stripefake does not model Accounts v2 and
// refuses the parameter: the charge goes to recovery with Stripe's reason, and the request is
// checked here (its shape is checked against stripe-mock in internal/stripeapi).
func TestChargeAccountsV2SendsCustomerAccount(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{Flags: []string{"-stripe-customer-model", "account"}})
	ctx := context.Background()
	c := e.customer("acct-model", "pm_card_visa")
	_, err := e.Pool.Exec(ctx, `update billing.customers set stripe_account_id = 'acct_1Nv0FGQ9RKHgCVdK' where id = $1`, c.ID)
	require.NoError(t, err)
	noAccount := e.customer("no-acct", "pm_card_visa")
	id, other := e.charge(c, 990, "usd"), e.charge(noAccount, 990, "usd")
	e.start()
	states := e.waitSettled([]int64{id, other}, 20*time.Second)
	require.Equal(t, "the customer has no Stripe account (customer_account)", states[other].Reason)
	bodies := e.Front.createBodies()
	require.Len(t, bodies, 1)
	require.Equal(t, "acct_1Nv0FGQ9RKHgCVdK", bodies[0].Get("customer_account"))
	require.Empty(t, bodies[0]["customer"])
	require.Equal(t, "recovering", states[id].Status)
	require.Contains(t, states[id].Reason, "Stripe refused attempt 1")
	a := e.attempts(id)[0]
	require.Equal(t, "failed", a.Outcome)
	require.Equal(t, 400, *a.HTTPStatus)
}
