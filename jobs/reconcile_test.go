package jobs_test

import (
	"context"
	"maps"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/stripefake"
)

// crashedAttempt leaves the database as a process killed right after recording attempt 1 of a
// new ad-hoc charge would: the charge processing, the attempt in flight since age ago, no job.
func (e *env) crashedAttempt(c dbtest.Customer, amount int64, age time.Duration) int64 {
	e.t.Helper()
	return e.crashedAttemptWithKey(c, amount, age, func(id int64) string { return jobs.IdempotencyKey(e.installation(), id, 1) })
}

// legacyKey is the key of attempt 1 of a charge as billingd made it before keys named the
// installation.
func legacyKey(id int64) string { return "billingd-charge-" + itoa(id) + "-attempt-1" }

// crashedAttemptWithKey is crashedAttempt with the attempt's key made by key from the charge id.
func (e *env) crashedAttemptWithKey(c dbtest.Customer, amount int64, age time.Duration, key func(int64) string) int64 {
	e.t.Helper()
	ctx := context.Background()
	var id int64
	require.NoError(e.t, e.Pool.QueryRow(ctx, insertAdhocQuery, c.ID, amount, "usd", "Crashed top-up").Scan(&id))
	_, err := e.Pool.Exec(ctx, `update billing.charges set status = 'processing', attempt_count = 1, payment_method_id = $2 where id = $1`, id, c.PaymentMethodID)
	require.NoError(e.t, err)
	_, err = e.Pool.Exec(ctx, `
		insert into billing.charge_attempts (charge_id, attempt_no, idempotency_key, payment_method_id, description, tries, started_at, last_try_at)
		values ($1, 1, $2, $3, 'Crashed top-up', 1, now() - make_interval(secs => $4), now() - make_interval(secs => $4))`,
		id, key(id), c.PaymentMethodID, age.Seconds())
	require.NoError(e.t, err)
	return id
}

// An attempt recorded but maybe never sent, its key still kept: reconcile sends the same
// request with the same key and settles what comes back.
func TestReconcileReplaysTheKeyWhileItIsKept(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	id := e.crashedAttempt(e.customer("replay", "pm_card_visa"), 3100, 10*time.Second)
	// The crashed process was also running a sweep and this charge's reconcile job: jobs left
	// "running" by a dead process must not block the next ones.
	ctx := context.Background()
	for _, args := range []jobs.ReconcileArgs{{}, {ChargeID: id}} {
		res, err := e.Client.Insert(ctx, args, nil)
		require.NoError(t, err)
		_, err = e.Pool.Exec(ctx, `update river_job set state = 'running', attempt = 1, attempted_at = now() where id = $1`, res.Job.ID)
		require.NoError(t, err)
	}
	e.start()
	st := e.waitStatus(id, "succeeded", 20*time.Second)
	require.Equal(t, "collected by attempt 1", st.Reason)
	as := e.attempts(id)
	require.Len(t, as, 1)
	require.Equal(t, "reconcile", *as[0].SettledBy)
	require.Equal(t, []string{jobs.IdempotencyKey(e.installation(), id, 1)}, e.Front.createKeys())
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
}

// An attempt whose key has surely expired and for which Stripe has no PaymentIntent charged
// nothing: it fails, and the charge is retried with a new attempt and a new key.
func TestReconcileRetriesWithANewKeyAfterTheKeyExpired(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{})
	id := e.crashedAttempt(e.customer("expired", "pm_card_visa"), 4400, 26*time.Hour)
	e.start()
	st := e.waitStatus(id, "succeeded", 20*time.Second)
	require.Equal(t, "collected by attempt 2", st.Reason)
	as := e.attempts(id)
	require.Len(t, as, 2)
	require.Equal(t, "failed", as[0].Outcome)
	require.Equal(t, "reconcile", *as[0].SettledBy)
	require.Nil(t, as[0].PI)
	require.Equal(t, "succeeded", as[1].Outcome)
	require.Equal(t, jobs.IdempotencyKey(e.installation(), id, 2), as[1].Key)
	require.Equal(t, []string{jobs.IdempotencyKey(e.installation(), id, 2)}, e.Front.createKeys(), "the expired key is never sent again")
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
}

// An attempt whose key expired but whose PaymentIntent exists is settled from it, never
// charged again: an attempt of this version (its key and PaymentIntent name the installation),
// and one recorded before keys and PaymentIntents named it (found by charge_id alone).
func TestReconcileFindsThePaymentIntentBySearch(t *testing.T) {
	t.Parallel()
	for _, legacy := range []bool{false, true} {
		t.Run(map[bool]string{false: "installation", true: "before installations"}[legacy], func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, envOpts{})
			c := e.customer("found", "pm_card_visa")
			md := map[string]string{"source": "adhoc", "charge_attempt": "1", "billingd_installation": e.installation()}
			key := func(id int64) string { return jobs.IdempotencyKey(e.installation(), id, 1) }
			if legacy {
				delete(md, "billingd_installation")
				key = legacyKey
			}
			id := e.crashedAttemptWithKey(c, 5100, 26*time.Hour, key)
			md["charge_id"] = itoa(id)
			// The request did reach Stripe before the crash.
			e.createPaymentIntent(c, 5100, md, key(id))
			e.start()
			e.waitStatus(id, "succeeded", 20*time.Second)
			as := e.attempts(id)
			require.Len(t, as, 1, "no second attempt")
			require.Equal(t, "reconcile", *as[0].SettledBy)
			require.NotNil(t, as[0].PI)
			require.Len(t, e.Front.createKeys(), 1, "only the pre-crash request")
			require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
		})
	}
}

// createPaymentIntent creates at stripefake, as billingd's charge job would, a PaymentIntent for
// c's saved card.
func (e *env) createPaymentIntent(c dbtest.Customer, amount int64, md map[string]string, key string) *stripe.PaymentIntent {
	e.t.Helper()
	var pmID string
	require.NoError(e.t, e.Pool.QueryRow(context.Background(), `select stripe_payment_method_id from billing.payment_methods where id = $1`, c.PaymentMethodID).Scan(&pmID))
	pi, err := e.Stripe.V1PaymentIntents.Create(context.Background(), stripeapi.OffSessionPaymentIntent(c.StripeID, pmID, amount, "usd",
		"Crashed top-up", md, key))
	require.NoError(e.t, err)
	return pi
}

// A search index that lags (as Stripe's does, up to a minute) never makes reconcile conclude
// that nothing was charged while the key can still tell.
func TestReconcileWithLaggingSearch(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOpts{Fake: []stripefake.Option{stripefake.WithSearchLag(3 * time.Second)}})
	id := e.charge(e.customer("lag", "pm_card_visa"), 2600, "usd")
	e.Fake.InjectFaults(stripefake.KindCreatePaymentIntent, 1, stripefake.Fault{Kind: stripefake.Fault500After})
	e.start()
	e.waitStatus(id, "succeeded", 30*time.Second)
	require.Len(t, e.attempts(id), 1)
	require.Equal(t, 1, e.Fake.SuccessfulCharges(itoa(id)))
}

// retrievePI reads a PaymentIntent as a webhook would carry it.
func (e *env) retrievePI(chargeID int64) *stripe.PaymentIntent {
	e.t.Helper()
	pis := e.Fake.PaymentIntentsByMetadata("charge_id", itoa(chargeID))
	require.Len(e.t, pis, 1)
	sc := stripeapi.NewClient("sk_test_billingd", e.FakeURL, nil, 0)
	pi, err := sc.V1PaymentIntents.Retrieve(context.Background(), pis[0].ID, nil)
	require.NoError(e.t, err)
	return pi
}

func TestSettlePaymentIntentTx(t *testing.T) {
	t.Parallel()
	// Reconcile is kept away so that only the "webhook" settles.
	e := newEnv(t, envOpts{Flags: []string{"-reconcile-after", "1h", "-reconcile-schedule", "0 0 1 1 *"}})
	ctx := context.Background()
	good := e.charge(e.customer("late-ok", "pm_card_visa"), 1500, "usd")
	lost := e.charge(e.customer("late-lost", "pm_card_chargeDeclinedLostCard"), 1600, "usd")
	e.Fake.InjectFaults(stripefake.KindCreatePaymentIntent, 2, stripefake.Fault{Kind: stripefake.Fault500After})
	e.start()
	require.Eventually(t, func() bool {
		g, l := e.attempts(good), e.attempts(lost)
		return len(g) == 1 && len(l) == 1 && g[0].Outcome == "unknown" && l[0].Outcome == "unknown"
	}, 20*time.Second, 20*time.Millisecond)
	require.Equal(t, "processing", e.chargeState(good).Status)

	settle := func(pi *stripe.PaymentIntent) bool {
		var known bool
		e.inTx(func(tx pgx.Tx) {
			var err error
			known, err = jobs.SettlePaymentIntentTx(ctx, tx, e.Client, e.Deps, pi)
			require.NoError(t, err)
		})
		return known
	}
	goodPI := e.retrievePI(good)
	require.Equal(t, e.installation(), goodPI.Metadata["billingd_installation"])
	foreign := *goodPI
	foreign.Metadata = maps.Clone(goodPI.Metadata)
	foreign.Metadata["billingd_installation"] = "0b9e4f7a-1c2d-4e5f-8a9b-3c4d5e6f7a8b"
	require.False(t, settle(&foreign), "another installation's PaymentIntent for its own charge of this id")
	require.Equal(t, "processing", e.chargeState(good).Status)
	require.True(t, settle(goodPI))
	require.Equal(t, "succeeded", e.chargeState(good).Status)
	a := e.attempts(good)[0]
	require.Equal(t, "succeeded", a.Outcome)
	require.Equal(t, "webhook", *a.SettledBy)
	require.Equal(t, goodPI.ID, *a.PI)

	require.True(t, settle(goodPI), "a duplicate event")
	require.Equal(t, a, e.attempts(good)[0], "changes nothing")

	require.True(t, settle(e.retrievePI(lost)))
	st := e.chargeState(lost)
	require.Equal(t, "recovering", st.Status)
	require.Equal(t, "declined (lost_card): not retried automatically", st.Reason)
	var recoveries int
	require.NoError(t, e.Pool.QueryRow(ctx, `select count(*) from billing.recoveries where charge_id = $1 and status = 'open'`, lost).Scan(&recoveries))
	require.Equal(t, 1, recoveries)

	require.False(t, settle(&stripe.PaymentIntent{ID: "pi_other", Metadata: map[string]string{"charge_id": itoa(good)}}),
		"a PaymentIntent of the charge that no attempt made (a recovery payment) is not the charge job's")
	require.False(t, settle(&stripe.PaymentIntent{ID: "pi_nobody", Metadata: map[string]string{"charge_id": "999999", "charge_attempt": "1"}}))
	require.False(t, settle(&stripe.PaymentIntent{ID: "pi_none"}))
}
