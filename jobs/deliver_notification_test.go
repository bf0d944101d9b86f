package jobs_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/dbtest"
	"github.com/billingd/billingd/jobs"
)

// outboxFixture is a recovery notification as notify_recovery writes it, for one channel.
func outboxFixture(t *testing.T, pool *pgxpool.Pool, customerID, chargeID int64, channel, recipient string) int64 {
	t.Helper()
	payload := `{}`
	if channel == "webhook" {
		payload = `{"type":"recovery.payment_required","charge_id":1,"amount":5000,"currency":"jpy","amount_display":"¥5,000","url":"https://billing.example.test/recover/x"}`
	}
	return scalar[int64](t, pool, `
		insert into billing.notifications (customer_id, charge_id, channel, kind, recipient, subject, body, payload, dedupe_key)
		values ($1, $2::bigint, $3, 'recovery', $4, 'Payment needed: ¥5,000 for Plan', 'Hello, please pay ¥5,000.', $5::jsonb, 'test:' || $3 || ':' || $2::text)
		returning id`, customerID, chargeID, channel, recipient, payload)
}

func insertDelivery(t *testing.T, b *bundle, notificationID int64) int64 {
	t.Helper()
	res, err := b.client.Insert(context.Background(), jobs.DeliverNotificationArgs{NotificationID: notificationID}, nil)
	require.NoError(t, err)
	return res.Job.ID
}

type notificationRow struct {
	Status    string
	Attempts  int
	LastError string
	SentAt    *time.Time
}

func notificationOf(t *testing.T, pool *pgxpool.Pool, id int64) notificationRow {
	t.Helper()
	var n notificationRow
	require.NoError(t, pool.QueryRow(context.Background(),
		`select status, attempts, coalesce(last_error, ''), sent_at from billing.notifications where id = $1`, id).
		Scan(&n.Status, &n.Attempts, &n.LastError, &n.SentAt))
	return n
}

// A recovery email goes through a real SMTP server with AUTH; running the job again sends
// nothing more.
func TestDeliverEmail(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	cust := dbtest.NewCustomer(t, b.pool, dbtest.CustomerOpts{Ref: "mail"})
	charge := newCharge(t, b.pool, cust.ID, 5000, "jpy", "Plan", "recovering")
	openRecovery(t, b.pool, charge)
	id := outboxFixture(t, b.pool, cust.ID, charge, "email", "mail@example.com")

	job := insertDelivery(t, b, id)
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "deliver_notification", job))

	msgs := b.mailbox.Messages()
	require.Len(t, msgs, 1)
	require.Equal(t, "billing@example.test", msgs[0].From)
	require.Equal(t, []string{"mail@example.com"}, msgs[0].To)
	require.Contains(t, msgs[0].Data, "Subject: =?UTF-8?q?Payment_needed:_=C2=A55,000_for_Plan?=")
	require.Contains(t, msgs[0].Data, "Auto-Submitted: auto-generated")
	require.Regexp(t, `Message-ID: <billingd\.\d+\.test\.email\.\d+@example\.test>`, msgs[0].Data)
	n := notificationOf(t, b.pool, id)
	require.Equal(t, "sent", n.Status)
	require.Equal(t, 1, n.Attempts)
	require.NotNil(t, n.SentAt)

	// The same job again (River's rescuer, a duplicate insert): nothing more is sent.
	job2 := insertDelivery(t, b, id)
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "deliver_notification", job2))
	require.Len(t, b.mailbox.Messages(), 1)
	require.NotContains(t, b.logs.String(), "s3cret-smtp", "the SMTP password never reaches the logs")
}

// Wrong SMTP credentials are a failure that River retries, recorded without the password.
func TestDeliverEmailBadCredentials(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.mailbox.setPassword("rotated-password") // the server's password changed; billingd's did not
	cust := dbtest.NewCustomer(t, b.pool, dbtest.CustomerOpts{Ref: "badauth"})
	charge := newCharge(t, b.pool, cust.ID, 1099, "usd", "Plan", "recovering")
	openRecovery(t, b.pool, charge)
	id := outboxFixture(t, b.pool, cust.ID, charge, "email", "badauth@example.com")

	job := insertDelivery(t, b, id)
	requireEvent(t, river.EventKindJobFailed, b.waitDone(t, "deliver_notification", job))
	require.Empty(t, b.mailbox.Messages())
	n := notificationOf(t, b.pool, id)
	require.Equal(t, "pending", n.Status)
	require.Equal(t, 1, n.Attempts)
	require.NotEmpty(t, n.LastError)
	require.NotContains(t, n.LastError, "s3cret-smtp")
	require.NotContains(t, b.logs.String(), "s3cret-smtp")

	// The server takes the password again: the retry delivers.
	b.mailbox.setPassword("s3cret-smtp")
	_, err := b.client.JobRetry(context.Background(), job)
	require.NoError(t, err)
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "deliver_notification", job))
	require.Len(t, b.mailbox.Messages(), 1)
	n = notificationOf(t, b.pool, id)
	require.Equal(t, "sent", n.Status)
	require.Equal(t, 2, n.Attempts)
}

// The POST to the application is signed; the application's own verification accepts it. A 5xx
// answer is retried with the same body and notification id.
func TestDeliverWebhookSignedAndRetried(t *testing.T) {
	t.Parallel()
	b := setup(t, nil)
	b.app.failNext(http.StatusServiceUnavailable)
	cust := dbtest.NewCustomer(t, b.pool, dbtest.CustomerOpts{Ref: "hook"})
	charge := newCharge(t, b.pool, cust.ID, 5000, "jpy", "Plan", "recovering")
	openRecovery(t, b.pool, charge)
	id := outboxFixture(t, b.pool, cust.ID, charge, "webhook", "hook")

	job := insertDelivery(t, b, id)
	requireEvent(t, river.EventKindJobFailed, b.waitDone(t, "deliver_notification", job))
	require.Empty(t, b.app.Posts())
	n := notificationOf(t, b.pool, id)
	require.Equal(t, "pending", n.Status)
	require.Contains(t, n.LastError, "503")

	_, err := b.client.JobRetry(context.Background(), job)
	require.NoError(t, err)
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "deliver_notification", job))
	posts := b.app.Posts()
	require.Len(t, posts, 1)
	require.Empty(t, b.app.Rejected())
	require.Equal(t, strconv.FormatInt(id, 10), posts[0].NotificationID)
	var body map[string]any
	require.NoError(t, json.Unmarshal(posts[0].Body, &body))
	require.Equal(t, "recovery.payment_required", body["type"])
	require.Equal(t, "¥5,000", body["amount_display"])
	require.EqualValues(t, id, body["id"])
	n = notificationOf(t, b.pool, id)
	require.Equal(t, "sent", n.Status)
	require.Equal(t, 2, n.Attempts)
}

// An application that holds another secret rejects the POST: the signature is really checked.
func TestDeliverWebhookWrongSecretIsRejected(t *testing.T) {
	t.Parallel()
	b := setup(t, func(c *config.Config) { c.NotifySecret = "not-the-applications-secret" })
	cust := dbtest.NewCustomer(t, b.pool, dbtest.CustomerOpts{Ref: "wrongkey"})
	charge := newCharge(t, b.pool, cust.ID, 5000, "jpy", "Plan", "recovering")
	openRecovery(t, b.pool, charge)
	id := outboxFixture(t, b.pool, cust.ID, charge, "webhook", "wrongkey")
	job := insertDelivery(t, b, id)
	requireEvent(t, river.EventKindJobFailed, b.waitDone(t, "deliver_notification", job))
	require.Empty(t, b.app.Posts())
	require.Equal(t, []string{"signature mismatch"}, b.app.Rejected())
	require.Contains(t, notificationOf(t, b.pool, id).LastError, "401")
}

// A notification whose charge was collected before delivery is skipped, not sent; one whose
// channel is no longer configured fails for good at once.
func TestDeliverSkipsSettledAndFailsUnconfigured(t *testing.T) {
	t.Parallel()
	b := setup(t, func(c *config.Config) { c.NotifyURL = "" })
	cust := dbtest.NewCustomer(t, b.pool, dbtest.CustomerOpts{Ref: "settled"})
	charge := newCharge(t, b.pool, cust.ID, 5000, "jpy", "Plan", "retry_scheduled")
	openRecovery(t, b.pool, charge)
	email := outboxFixture(t, b.pool, cust.ID, charge, "email", "settled@example.com")
	// The automatic retry succeeds: the close trigger closes the recovery.
	_, err := b.pool.Exec(context.Background(), `update billing.charges set status = 'processing' where id = $1`, charge)
	require.NoError(t, err)
	_, err = b.pool.Exec(context.Background(), `update billing.charges set status = 'succeeded' where id = $1`, charge)
	require.NoError(t, err)

	job := insertDelivery(t, b, email)
	requireEvent(t, river.EventKindJobCompleted, b.waitDone(t, "deliver_notification", job))
	require.Empty(t, b.mailbox.Messages())
	require.Equal(t, "skipped", notificationOf(t, b.pool, email).Status)

	charge2 := newCharge(t, b.pool, cust.ID, 5000, "jpy", "Plan", "recovering")
	openRecovery(t, b.pool, charge2)
	hook := outboxFixture(t, b.pool, cust.ID, charge2, "webhook", "settled")
	job = insertDelivery(t, b, hook)
	requireEvent(t, river.EventKindJobCancelled, b.waitDone(t, "deliver_notification", job))
	n := notificationOf(t, b.pool, hook)
	require.Equal(t, "failed", n.Status)
	require.Contains(t, n.LastError, "BILLING_NOTIFY_URL")
}

func TestSignNotification(t *testing.T) {
	t.Parallel()
	body := []byte(`{"id":7,"type":"recovery.payment_required"}`)
	at := time.Unix(1_700_000_000, 0)
	h := jobs.SignNotification("secret", at, body)
	require.True(t, strings.HasPrefix(h, "t=1700000000,v1="))
	require.NoError(t, verifyAsApplication("secret", h, body, at), "the documented recipe verifies it")
	require.NoError(t, jobs.VerifyNotification("secret", h, body, 5*time.Minute, at.Add(time.Minute)))

	for name, err := range map[string]error{
		"tampered body":  jobs.VerifyNotification("secret", h, append(body, ' '), 5*time.Minute, at),
		"other secret":   jobs.VerifyNotification("other", h, body, 5*time.Minute, at),
		"replayed later": jobs.VerifyNotification("secret", h, body, 5*time.Minute, at.Add(6*time.Minute)),
		"no signature":   jobs.VerifyNotification("secret", "t=1700000000", body, 5*time.Minute, at),
		"garbage":        jobs.VerifyNotification("secret", "hello", body, 5*time.Minute, at),
	} {
		require.Error(t, err, name)
	}
	// Several v1 values (a secret rotation): any match is enough.
	rotated := h + ",v1=" + strings.Repeat("ab", 32)
	require.NoError(t, jobs.VerifyNotification("secret", rotated, body, 5*time.Minute, at))
}
