package jobs_test

import (
	"encoding/json"
	"io"
	"mime"
	"mime/quotedprintable"
	"net/mail"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/stripeapi"
	"github.com/billingd/billingd/jobs"
	"github.com/billingd/billingd/stripefake"
)

// savedCard is the card customers saved at onboarding: it attaches, and declines when charged.
const savedCard = "pm_card_chargeCustomerFail"

// mailText returns the subject and the decoded text body of a received email.
func mailText(t *testing.T, raw string) (subject, body string) {
	t.Helper()
	msg, err := mail.ReadMessage(strings.NewReader(raw))
	require.NoError(t, err)
	subject, err = new(mime.WordDecoder).DecodeHeader(msg.Header.Get("Subject"))
	require.NoError(t, err)
	var r io.Reader = msg.Body
	if strings.EqualFold(msg.Header.Get("Content-Transfer-Encoding"), "quoted-printable") {
		r = quotedprintable.NewReader(r)
	}
	b, err := io.ReadAll(r)
	require.NoError(t, err)
	return subject, string(b)
}

// waitNotifications waits until n deliver_notification jobs have completed.
func (b *bundle) waitDelivered(t *testing.T, n int) {
	t.Helper()
	for range n {
		requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "deliver_notification", nil))
	}
}

func (b *bundle) fakeSessions(chargeID int64) []stripefake.CheckoutSession {
	return b.fake.CheckoutSessionsByMetadata(stripeapi.MetadataChargeID, strconv.FormatInt(chargeID, 10))
}

// The main path: a declined charge gives exactly one recovery session and one
// notification per channel (an email the SMTP server received, a POST the application
// verified); paying that session with pm_card_visa marks the charge recovered and makes the new
// card the customer's default.
func TestRecoveryEndToEnd(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	ctx := t.Context()
	cust := b.stripeCustomer(t, "ann", savedCard)
	charge := newCharge(t, b.pool, cust.ID, 5000, "jpy", "Installment 2 of 6", "processing")

	notify := b.decline(t, cust, charge)
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", notify))
	b.waitDelivered(t, 2)

	// One session, at Stripe and in billing, for the amount due, for this customer.
	sessions := b.fakeSessions(charge)
	require.Len(t, sessions, 1)
	cs := sessions[0]
	require.Equal(t, "payment", cs.Mode)
	require.Equal(t, "open", cs.Status)
	require.EqualValues(t, 5000, cs.AmountTotal)
	require.Equal(t, "jpy", cs.Currency)
	require.Equal(t, cust.StripeID, cs.Customer)
	require.Equal(t, cs.URL, scalar[string](t, b.pool, `select url from billing.recovery_sessions where charge_id = $1 and status = 'open'`, charge))
	require.Equal(t, 1, scalar[int](t, b.pool, `select count(*) from billing.recovery_sessions where charge_id = $1`, charge))

	// One notification per channel, delivered.
	require.Equal(t, 2, scalar[int](t, b.pool, `select count(*) from billing.notifications where charge_id = $1 and status = 'sent'`, charge))
	token := scalar[string](t, b.pool, `select token from billing.recoveries where charge_id = $1`, charge)
	link := "https://billing.example.test/recover/" + token
	msgs := b.mailbox.Messages()
	require.Len(t, msgs, 1)
	require.Equal(t, []string{"ann@example.com"}, msgs[0].To)
	subject, body := mailText(t, msgs[0].Data)
	require.Equal(t, "Payment needed: ¥5,000 for Installment 2 of 6", subject)
	require.Contains(t, body, `We could not collect ¥5,000 for "Installment 2 of 6"`)
	require.Contains(t, body, link)
	posts := b.app.Posts()
	require.Len(t, posts, 1)
	require.Empty(t, b.app.Rejected())
	var event map[string]any
	require.NoError(t, json.Unmarshal(posts[0].Body, &event))
	require.Equal(t, "recovery.payment_required", event["type"])
	require.Equal(t, "ann", event["customer_ref"])
	require.EqualValues(t, charge, event["charge_id"])
	require.EqualValues(t, 5000, event["amount"])
	require.Equal(t, "jpy", event["currency"])
	require.Equal(t, "¥5,000", event["amount_display"])
	require.Equal(t, link, event["url"])
	require.Equal(t, "generic_decline", event["reason"])

	// A second decline of the same charge, and the job run again: nothing new.
	tx, err := b.pool.Begin(ctx)
	require.NoError(t, err)
	opened, err := jobs.StartRecoveryTx(ctx, tx, b.client, charge, "again")
	require.NoError(t, err)
	require.False(t, opened)
	require.NoError(t, tx.Commit(ctx))
	again, err := b.client.Insert(ctx, jobs.NotifyRecoveryArgs{ChargeID: charge, Round: 1}, nil)
	require.NoError(t, err)
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", again.Job.ID))
	require.Len(t, b.fakeSessions(charge), 1)
	require.Equal(t, 2, scalar[int](t, b.pool, `select count(*) from billing.notifications where charge_id = $1`, charge))
	require.Len(t, jobsOf(t, b.pool, "deliver_notification"), 2)

	// The link leads to that session.
	got, err := jobs.ResolveRecoveryLink(ctx, b.deps, b.client, token)
	require.NoError(t, err)
	require.Equal(t, jobs.LinkRedirect, got.Outcome)
	require.Equal(t, cs.URL, got.URL)

	// The customer pays with a new card.
	require.NoError(t, b.fake.CompleteCheckoutSession(ctx, cs.ID, "pm_card_visa"))
	requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "adopt_payment_method", nil))
	b.requireEventsProcessed(t)
	require.Equal(t, "recovered", scalar[string](t, b.pool, `select status from billing.charges where id = $1`, charge))
	require.Equal(t, "paid", scalar[string](t, b.pool, `select status from billing.recoveries where charge_id = $1`, charge))
	require.Equal(t, "completed", scalar[string](t, b.pool, `select status from billing.recovery_sessions where checkout_session_id = $1`, cs.ID))
	paid, ok := b.fake.CheckoutSession(cs.ID)
	require.True(t, ok)
	pi, ok := b.fake.PaymentIntent(paid.PaymentIntent)
	require.True(t, ok)
	require.Equal(t, strconv.FormatInt(charge, 10), pi.Metadata[stripeapi.MetadataChargeID], "metadata charge_id on the PaymentIntent too")
	require.Equal(t, pi.ID, scalar[string](t, b.pool, `select payment_intent_id from billing.charges where id = $1`, charge))

	var defaultPM, brand, last4, owner string
	require.NoError(t, b.pool.QueryRow(ctx, `
		select pm.stripe_payment_method_id, pm.brand, pm.last4, cu.stripe_customer_id
		from billing.customers cu join billing.payment_methods pm on pm.id = cu.default_payment_method_id
		where cu.id = $1`, cust.ID).Scan(&defaultPM, &brand, &last4, &owner))
	require.Equal(t, pi.PaymentMethod, defaultPM, "the card that paid is the default for future charges")
	require.Equal(t, "visa", brand)
	require.Equal(t, "4242", last4)
	attached := b.fake.CustomerPaymentMethods(cust.StripeID)
	require.Contains(t, stripefakeIDs(attached), defaultPM, "saved to the customer at Stripe for off-session use")

	require.Equal(t, 1, b.fake.SuccessfulCharges(strconv.FormatInt(charge, 10)))
	require.Equal(t, stripefake.Totals{Collected: 5000}, b.fake.Totals()["jpy"])

	// The link now says it is paid, and creates nothing.
	got, err = jobs.ResolveRecoveryLink(ctx, b.deps, b.client, token)
	require.NoError(t, err)
	require.Equal(t, jobs.LinkPaid, got.Outcome)
	require.Len(t, b.fakeSessions(charge), 1)
	require.NotContains(t, b.logs.String(), token, "the token never reaches the logs")
}

func stripefakeIDs(pms []stripefake.PaymentMethod) []string {
	var ids []string
	for _, pm := range pms {
		ids = append(ids, pm.ID)
	}
	return ids
}

// An expired (or expiring) session is replaced through the link: the old one is expired at
// Stripe first, so that only one page is ever payable, and clicks that race get the same new
// session.
func TestRecoveryLinkReplacesExpiredSession(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	ctx := t.Context()
	cust := b.stripeCustomer(t, "bob", savedCard)
	charge := newCharge(t, b.pool, cust.ID, 1099, "usd", "Top-up", "processing")
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.decline(t, cust, charge)))
	token := scalar[string](t, b.pool, `select token from billing.recoveries where charge_id = $1`, charge)
	first := b.fakeSessions(charge)[0]

	// billingd's view: the session has minutes left; Stripe's: still open.
	_, err := b.pool.Exec(ctx, `update billing.recovery_sessions set expires_at = now() + interval '2 minutes' where charge_id = $1`, charge)
	require.NoError(t, err)

	const clicks = 6
	var wg sync.WaitGroup
	links := make([]jobs.RecoveryLink, clicks)
	errs := make([]error, clicks)
	for i := range clicks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			links[i], errs[i] = jobs.ResolveRecoveryLink(ctx, b.deps, b.client, token)
		}()
	}
	wg.Wait()
	var url string
	for i := range clicks {
		require.NoError(t, errs[i])
		require.Equal(t, jobs.LinkRedirect, links[i].Outcome, "click %d", i)
		if url == "" {
			url = links[i].URL
		}
		require.Equal(t, url, links[i].URL, "every click gets the same fresh session")
	}
	require.NotEqual(t, first.URL, url)

	sessions := b.fakeSessions(charge)
	require.Len(t, sessions, 2, "one replacement, whatever the number of clicks")
	old, _ := b.fake.CheckoutSession(first.ID)
	require.Equal(t, "expired", old.Status, "the old page was expired at Stripe before the new one was made")
	var open []stripefake.CheckoutSession
	for _, s := range sessions {
		if s.Status == "open" {
			open = append(open, s)
		}
	}
	require.Len(t, open, 1)
	require.Equal(t, url, open[0].URL)
	require.Equal(t, "expired", scalar[string](t, b.pool, `select status from billing.recovery_sessions where checkout_session_id = $1`, first.ID))
	require.Equal(t, 2, scalar[int](t, b.pool, `select seq from billing.recovery_sessions where status = 'open' and charge_id = $1`, charge))

	// Stripe expired the new one by itself (24 hours later): the next click makes a third.
	_, err = b.pool.Exec(ctx, `update billing.recovery_sessions set expires_at = now() - interval '1 minute' where status = 'open' and charge_id = $1`, charge)
	require.NoError(t, err)
	_, err = b.stripe.V1CheckoutSessions.Expire(ctx, open[0].ID, stripeapi.ExpireSession())
	require.NoError(t, err)
	got, err := jobs.ResolveRecoveryLink(ctx, b.deps, b.client, token)
	require.NoError(t, err)
	require.Equal(t, jobs.LinkRedirect, got.Outcome)
	require.Len(t, b.fakeSessions(charge), 3)
	require.Equal(t, 3, scalar[int](t, b.pool, `select seq from billing.recovery_sessions where status = 'open' and charge_id = $1`, charge))
}

// Bad input through the link: a forged or malformed token, a canceled charge, a charge whose
// window has ended. Each gets its answer and changes nothing: no session, no job, no write.
func TestRecoveryLinkBadInputChangesNothing(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	ctx := t.Context()
	cust := b.stripeCustomer(t, "cid", savedCard)

	canceled := newCharge(t, b.pool, cust.ID, 1000, "eur", "Canceled plan", "processing")
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.decline(t, cust, canceled)))
	_, err := b.pool.Exec(ctx, `update billing.charges set status = 'canceled' where id = $1`, canceled)
	require.NoError(t, err)
	requireEvent(t, river.EventKindJobCompleted, b.waitJob(t, "expire_recovery", nil))
	canceledToken := scalar[string](t, b.pool, `select token from billing.recoveries where charge_id = $1`, canceled)

	late := newCharge(t, b.pool, cust.ID, 1000, "eur", "Late plan", "processing")
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.decline(t, cust, late)))
	_, err = b.pool.Exec(ctx, `update billing.recoveries set opened_at = now() - $2::interval where charge_id = $1`,
		late, (b.cfg.RecoveryWindow + time.Hour).String())
	require.NoError(t, err)
	_, err = b.pool.Exec(ctx, `update billing.recovery_sessions set expires_at = now() - interval '1 minute' where charge_id = $1`, late)
	require.NoError(t, err)
	lateToken := scalar[string](t, b.pool, `select token from billing.recoveries where charge_id = $1`, late)

	snapshot := func() string {
		// River's periodic jobs (inserted when the client becomes leader, and on their
		// schedules) may arrive at any moment: they are not the link's writes.
		return scalar[string](t, b.pool, `select format('%s/%s/%s/%s/%s',
			(select count(*) from river_job where kind not in ('due', 'reconcile_charges', 'recovery_sweep', 'prune_webhook_events')),
			(select count(*) from billing.recovery_sessions),
			(select string_agg(status || updated_at::text, ',' order by id) from billing.charges),
			(select string_agg(status || coalesce(closed_at::text, ''), ',' order by charge_id) from billing.recoveries),
			(select string_agg(status, ',' order by id) from billing.recovery_sessions))`)
	}
	before := snapshot()
	creates := b.fake.RequestCount(stripefake.KindCreateCheckoutSession)

	forged := strings.Repeat("A", 43)
	for _, tc := range []struct {
		token string
		want  jobs.LinkOutcome
	}{
		{forged, jobs.LinkNotFound},
		{canceledToken[:42] + "x", jobs.LinkNotFound},
		{"short", jobs.LinkNotFound},
		{"", jobs.LinkNotFound},
		{"'; drop table billing.charges; --" + strings.Repeat("a", 9), jobs.LinkNotFound},
		{canceledToken, jobs.LinkCanceled},
		{lateToken, jobs.LinkClosed},
	} {
		got, err := jobs.ResolveRecoveryLink(ctx, b.deps, b.client, tc.token)
		require.NoError(t, err, tc.token)
		require.Equal(t, tc.want, got.Outcome, tc.token)
		require.Empty(t, got.URL)
	}
	require.Equal(t, before, snapshot(), "nothing written")
	require.Equal(t, creates, b.fake.RequestCount(stripefake.KindCreateCheckoutSession), "no session created")

	// The notify job of an unknown charge is cancelled, not retried.
	res, err := b.client.Insert(ctx, jobs.NotifyRecoveryArgs{ChargeID: 987654, Round: 1}, nil)
	require.NoError(t, err)
	requireEvent(t, river.EventKindJobCancelled, b.waitDone(t, "notify_recovery", res.Job.ID))
}

// A Stripe 5xx while creating the session is stored under its idempotency key: the retry uses the
// next key, and the customer still gets exactly one recorded session and one notification per
// channel. A dropped connection after the work is replayed under the same key: no second session.
func TestNotifyRecoveryStripeFaults(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	cust := b.stripeCustomer(t, "dan", savedCard)

	c500 := newCharge(t, b.pool, cust.ID, 1230, "bhd", "Service", "processing")
	b.fake.InjectFaults(stripefake.KindCreateCheckoutSession, 1, stripefake.Fault{Kind: stripefake.Fault500After})
	job := b.decline(t, cust, c500)
	requireEvent(t, river.EventKindJobFailed, b.waitDone(t, "notify_recovery", job))
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", job))
	b.waitDelivered(t, 2)
	require.Len(t, b.fakeSessions(c500), 2, "the 500 made one that nobody will see, the retry another")
	require.Equal(t, 1, scalar[int](t, b.pool, `select count(*) from billing.recovery_sessions where charge_id = $1`, c500))
	require.Equal(t, 2, scalar[int](t, b.pool, `select seq from billing.recovery_sessions where charge_id = $1`, c500))
	require.Equal(t, 2, scalar[int](t, b.pool, `select count(*) from billing.notifications where charge_id = $1`, c500))
	_, body := mailText(t, b.mailbox.Messages()[0].Data)
	require.Contains(t, body, "BHD 1.230")

	cDrop := newCharge(t, b.pool, cust.ID, 1099, "usd", "Service", "processing")
	b.fake.InjectFaults(stripefake.KindCreateCheckoutSession, 1, stripefake.Fault{Kind: stripefake.FaultDropAfter})
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "notify_recovery", b.decline(t, cust, cDrop)))
	require.Len(t, b.fakeSessions(cDrop), 1, "stripe-go's retry replayed the same key")
	require.Equal(t, 1, scalar[int](t, b.pool, `select count(*) from billing.recovery_sessions where charge_id = $1`, cDrop))
}

// Two notify_recovery jobs for the same failure at once (a duplicate insert, the rescuer): one
// session, one notification per channel.
func TestNotifyRecoveryConcurrentRuns(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	ctx := t.Context()
	cust := b.stripeCustomer(t, "eve", savedCard)
	charge := newCharge(t, b.pool, cust.ID, 2500, "gbp", "Plan", "processing")
	first := b.decline(t, cust, charge)
	second, err := b.client.Insert(ctx, jobs.NotifyRecoveryArgs{ChargeID: charge, Round: 1}, nil)
	require.NoError(t, err)
	done := map[int64]river.EventKind{}
	for len(done) < 2 {
		ev := b.waitJob(t, "notify_recovery", nil)
		if ev.Kind == river.EventKindJobCompleted {
			done[ev.Job.ID] = ev.Kind
		}
	}
	require.Contains(t, done, first)
	require.Contains(t, done, second.Job.ID)
	b.waitDelivered(t, 2)
	require.Len(t, b.fakeSessions(charge), 1)
	require.Equal(t, 1, scalar[int](t, b.pool, `select count(*) from billing.recovery_sessions where charge_id = $1`, charge))
	require.Equal(t, 2, scalar[int](t, b.pool, `select count(*) from billing.notifications where charge_id = $1`, charge))
	require.Len(t, b.mailbox.Messages(), 1)
	require.Len(t, b.app.Posts(), 1)
}
