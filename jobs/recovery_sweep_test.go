package jobs_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/jobs"
)

// sweep runs the recovery sweep once and waits for it.
func (b *bundle) sweep(t *testing.T) {
	t.Helper()
	res, err := b.client.Insert(t.Context(), jobs.RecoverySweepArgs{}, nil)
	require.NoError(t, err)
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "recovery_sweep", res.Job.ID))
}

// installmentCharge inserts an active monthly plan of the customer and its second installment.
func installmentCharge(t *testing.T, pool *pgxpool.Pool, customerID, amount int64, currency string) (planID, chargeID int64) {
	t.Helper()
	planID = scalar[int64](t, pool, `
		insert into billing.installment_plans (customer_id, description, total_amount, currency, installment_count,
		                                       schedule_kind, anchor_day, starts_at, next_installment, next_due_at)
		values ($1, 'Sofa', $2 * 6, $3, 6, 'monthly', 1, now() - interval '40 days', 3, now() + interval '20 days')
		returning id`, customerID, amount, currency)
	chargeID = scalar[int64](t, pool, `
		insert into billing.charges (customer_id, source, source_id, period, amount, currency, description, status)
		values ($1, 'installment', $2, '2', $3, $4, 'Sofa, installment 2 of 6', 'processing') returning id`,
		customerID, planID, amount, currency)
	return planID, chargeID
}

// Reminders go out on the cadence while the charge is unpaid, each once, and stop before the
// window ends.
func TestRecoverySweepReminds(t *testing.T) {
	t.Parallel()
	b := setup(t, func(c *config.Config) { c.RecoveryReminderInterval = time.Hour })
	ctx := t.Context()
	cust := b.stripeCustomer(t, "ivy", savedCard)
	charge := newCharge(t, b.pool, cust.ID, 5000, "jpy", "Plan", "processing")
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.decline(t, cust, charge)))
	b.waitDelivered(t, 2)
	require.True(t, scalar[bool](t, b.pool, `select next_reminder_at between now() + interval '59 minutes' and now() + interval '61 minutes'
		from billing.recoveries where charge_id = $1`, charge), "first reminder an interval after the notification")

	b.sweep(t)
	require.Equal(t, 2, scalar[int](t, b.pool, `select count(*) from billing.notifications where charge_id = $1`, charge), "not due yet")

	_, err := b.pool.Exec(ctx, `update billing.recoveries set next_reminder_at = now() - interval '1 minute' where charge_id = $1`, charge)
	require.NoError(t, err)
	b.sweep(t)
	b.waitDelivered(t, 2)
	b.sweep(t) // a second run in the same period sends nothing more
	require.Equal(t, 1, scalar[int](t, b.pool, `select reminders_sent from billing.recoveries where charge_id = $1`, charge))
	require.Equal(t, 2, scalar[int](t, b.pool, `select count(*) from billing.notifications where charge_id = $1 and kind = 'reminder' and status = 'sent'`, charge))
	msgs := b.mailbox.Messages()
	require.Len(t, msgs, 2)
	subject, body := mailText(t, msgs[1].Data)
	require.Equal(t, "Reminder: Payment needed: ¥5,000 for Plan", subject)
	require.Contains(t, body, `¥5,000 for "Plan" is still unpaid`)
	posts := b.app.Posts()
	require.Len(t, posts, 2)
	var reminder map[string]any
	require.NoError(t, json.Unmarshal(posts[1].Body, &reminder))
	require.Equal(t, "recovery.reminder", reminder["type"])
	require.EqualValues(t, 1, reminder["reminder"])

	// Close to the end of the window: the last reminder, and no next one.
	_, err = b.pool.Exec(ctx, `update billing.recoveries set next_reminder_at = now() - interval '1 minute',
		opened_at = now() - $2::interval + interval '30 minutes' where charge_id = $1`, charge, b.cfg.RecoveryWindow.String())
	require.NoError(t, err)
	b.sweep(t)
	b.waitDelivered(t, 2)
	require.Equal(t, 2, scalar[int](t, b.pool, `select reminders_sent from billing.recoveries where charge_id = $1`, charge))
	require.True(t, scalar[bool](t, b.pool, `select next_reminder_at is null from billing.recoveries where charge_id = $1`, charge))
	require.Equal(t, 1, scalar[int](t, b.pool, `select count(*) from billing.notifications where dedupe_key like 'reminder:%:2:email'`))

	// A paid charge gets no reminder.
	require.NoError(t, b.fake.CompleteCheckoutSession(ctx, b.openSession(t, charge).ID, "pm_card_visa"))
	requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "adopt_payment_method", nil))
	_, err = b.pool.Exec(ctx, `update billing.recoveries set next_reminder_at = now() - interval '1 minute' where charge_id = $1`, charge)
	require.NoError(t, err)
	b.sweep(t)
	require.Equal(t, 6, scalar[int](t, b.pool, `select count(*) from billing.notifications where charge_id = $1`, charge))
}

// After the window, the charge is written off: uncollectible, its page expired at Stripe, its
// link closed, and the rest of its installment plan paused or continued as configured.
func TestRecoverySweepWritesOff(t *testing.T) {
	t.Parallel()
	for _, policy := range []string{"pause", "continue"} {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			b := setup(t, func(c *config.Config) { c.RecoveryPlanOnUncollectible = policy })
			ctx := t.Context()
			cust := b.stripeCustomer(t, "jay", savedCard)
			plan, charge := installmentCharge(t, b.pool, cust.ID, 1000, "eur")
			requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.decline(t, cust, charge)))
			page := b.openSession(t, charge)
			token := scalar[string](t, b.pool, `select token from billing.recoveries where charge_id = $1`, charge)
			// A second charge whose automatic attempt is in flight waits for the next sweep.
			busy := newCharge(t, b.pool, cust.ID, 700, "eur", "Top-up", "processing")
			requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.declineTo(t, cust, busy, "retry_scheduled")))
			require.True(t, b.startAttempt(t, busy))

			_, err := b.pool.Exec(ctx, `update billing.recoveries set opened_at = now() - $1::interval - interval '1 hour'`, b.cfg.RecoveryWindow.String())
			require.NoError(t, err)
			b.sweep(t)
			requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "expire_recovery", nil))

			require.Equal(t, "uncollectible", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, charge))
			require.Equal(t, "uncollectible", scalar[string](t, b.pool, `select status from billing.recoveries where charge_id = $1`, charge))
			got, _ := b.fake.CheckoutSession(page.ID)
			require.Equal(t, "expired", got.Status, "the page no longer takes money")
			require.Equal(t, "expired", scalar[string](t, b.pool, `select status from billing.recovery_sessions where checkout_session_id = $1`, page.ID))
			want := map[string]string{"pause": "paused", "continue": "active"}[policy]
			require.Equal(t, want, scalar[string](t, b.pool, `select status from billing.installment_plans where id = $1`, plan))
			require.Equal(t, "processing", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, busy))

			link, err := jobs.ResolveRecoveryLink(ctx, b.deps, b.client, token)
			require.NoError(t, err)
			require.Equal(t, jobs.LinkClosed, link.Outcome)
			require.True(t, strings.Contains(b.logs.String(), "charge written off"))
		})
	}
}
