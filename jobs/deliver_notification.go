package jobs

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/wneessen/go-mail"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/metrics"
)

// DeliverNotificationArgs asks for one row of the notifications outbox (billing.notifications)
// to be delivered: by email over SMTP, or by a signed HTTP POST to the host application.
//
// Delivery is at least once: a crash between sending and recording the send repeats it. Emails
// carry a Message-ID and POSTs a Billingd-Notification-Id header, the same on every try, so a
// receiver can drop repeats.
type DeliverNotificationArgs struct {
	NotificationID int64 `json:"notification_id"`
}

// Kind is the job kind.
func (DeliverNotificationArgs) Kind() string { return "deliver_notification" }

// InsertOpts puts deliveries on the notifications queue. River retries a failed delivery with
// its backoff (about attempt^4 seconds: 1 s, 16 s, 81 s, 4 min, ... 4 h; about 11 hours in all).
func (DeliverNotificationArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueNotifications, MaxAttempts: deliverMaxAttempts}
}

const deliverMaxAttempts = 12

// Headers of the POST to the host application.
const (
	// SignatureHeader carries "t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">" keyed
	// with BILLING_NOTIFY_SECRET.
	SignatureHeader = "Billingd-Signature"
	// NotificationIDHeader carries the notification's id, the same on every retry.
	NotificationIDHeader = "Billingd-Notification-Id"
)

// SignNotification returns the Billingd-Signature header value for body sent at t:
// "t=<unix seconds>,v1=<hex of HMAC-SHA256(secret, "<unix seconds>.<body>")>".
func SignNotification(secret string, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts))
	mac.Write([]byte("."))
	mac.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

// VerifyNotification checks a Billingd-Signature header against body, the way the host
// application should: the HMAC must match (compared in constant time) and t must lie within
// tolerance of now, so that a captured request cannot be replayed later. Several v1 values
// (during a secret rotation) are accepted if any matches.
func VerifyNotification(secret, header string, body []byte, tolerance time.Duration, now time.Time) error {
	var ts string
	var sigs [][]byte
	for _, part := range strings.Split(header, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue
		}
		switch k {
		case "t":
			ts = v
		case "v1":
			if b, err := hex.DecodeString(v); err == nil {
				sigs = append(sigs, b)
			}
		}
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || len(sigs) == 0 {
		return errors.New("signature header is malformed")
	}
	if d := now.Sub(time.Unix(sec, 0)); d > tolerance || d < -tolerance {
		return errors.New("signature timestamp is outside the tolerance")
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	want := mac.Sum(nil)
	for _, s := range sigs {
		if hmac.Equal(s, want) {
			return nil
		}
	}
	return errors.New("signature does not match")
}

// notifier sends notifications over the configured channels.
type notifier struct {
	cfg    *config.Config
	http   *http.Client
	now    func() time.Time
	logger *slog.Logger
}

func newNotifier(cfg *config.Config, logger *slog.Logger) *notifier {
	return &notifier{
		cfg:    cfg,
		http:   &http.Client{Timeout: 20 * time.Second},
		now:    time.Now,
		logger: logger,
	}
}

// errPermanent marks a delivery that no retry can fix (a channel no longer configured, an
// address that is not one).
var errPermanent = errors.New("permanent")

// outboxEntry is a notification as read for delivery.
type outboxEntry struct {
	ID        int64
	Channel   string
	Kind      string
	Recipient string
	Subject   string
	Body      string
	Payload   map[string]any
	DedupeKey string
	Status    string
	CreatedAt time.Time
	// Settled is true when the notification asks for a payment that is no longer due.
	Settled bool
}

// send delivers n once.
func (s *notifier) send(ctx context.Context, n outboxEntry) error {
	switch n.Channel {
	case channelEmail:
		return s.sendEmail(ctx, n)
	case channelWebhook:
		return s.post(ctx, n)
	default:
		return fmt.Errorf("%w: unknown channel %q", errPermanent, n.Channel)
	}
}

// webhookBody is the JSON POSTed for n: its payload plus its id and creation time. It is the same
// bytes on every try.
func webhookBody(n outboxEntry) ([]byte, error) {
	p := make(map[string]any, len(n.Payload)+2)
	for k, v := range n.Payload {
		p[k] = v
	}
	p["id"] = n.ID
	p["created"] = n.CreatedAt.Unix()
	return json.Marshal(p)
}

func (s *notifier) post(ctx context.Context, n outboxEntry) error {
	if s.cfg.NotifyURL == "" || s.cfg.NotifySecret == "" {
		return fmt.Errorf("%w: BILLING_NOTIFY_URL and BILLING_NOTIFY_SECRET are not set", errPermanent)
	}
	body, err := webhookBody(n)
	if err != nil {
		return fmt.Errorf("%w: encode notification: %v", errPermanent, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.cfg.NotifyURL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("%w: notification request: %v", errPermanent, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "billingd")
	req.Header.Set(NotificationIDHeader, strconv.FormatInt(n.ID, 10))
	req.Header.Set(SignatureHeader, SignNotification(s.cfg.NotifySecret, s.now(), body))
	resp, err := s.http.Do(req)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // drop the URL, which may carry a token
		}
		return fmt.Errorf("post notification: %w", err)
	}
	defer resp.Body.Close()
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("post notification: application answered %d: %s", resp.StatusCode, strings.TrimSpace(string(snippet)))
	}
	return nil
}

func (s *notifier) sendEmail(ctx context.Context, n outboxEntry) error {
	if s.cfg.SMTPURL == "" {
		return fmt.Errorf("%w: BILLING_SMTP_URL is not set", errPermanent)
	}
	st, err := config.ParseSMTPURL(s.cfg.SMTPURL)
	if err != nil {
		return fmt.Errorf("%w: %v", errPermanent, err)
	}
	msg := mail.NewMsg()
	if err := msg.From(s.cfg.EmailFrom); err != nil {
		return fmt.Errorf("%w: BILLING_EMAIL_FROM: %v", errPermanent, err)
	}
	if err := msg.To(n.Recipient); err != nil {
		return fmt.Errorf("%w: recipient: %v", errPermanent, err)
	}
	msg.Subject(n.Subject)
	msg.SetDateWithValue(n.CreatedAt)
	msg.SetMessageIDWithValue(fmt.Sprintf("billingd.%d.%s@%s", n.ID, strings.ReplaceAll(n.DedupeKey, ":", "."), domainOf(s.cfg.EmailFrom)))
	msg.SetGenHeader("Auto-Submitted", "auto-generated")
	msg.SetBodyString(mail.TypeTextPlain, n.Body)

	opts := []mail.Option{mail.WithPort(st.Port), mail.WithTimeout(20 * time.Second)}
	switch st.TLS {
	case "implicit":
		opts = append(opts, mail.WithSSL())
	case "starttls":
		opts = append(opts, mail.WithTLSPolicy(mail.TLSMandatory))
	case "opportunistic":
		opts = append(opts, mail.WithTLSPolicy(mail.TLSOpportunistic))
	case "off":
		opts = append(opts, mail.WithTLSPolicy(mail.NoTLS))
	}
	if st.Username != "" {
		// Over TLS, the strongest mechanism the server offers. Without TLS, PLAIN, which go-mail
		// sends only to a server on the loopback interface: a password never crosses a network
		// in clear text.
		auth := mail.SMTPAuthAutoDiscover
		if st.TLS == "off" {
			auth = mail.SMTPAuthPlain
		}
		opts = append(opts, mail.WithSMTPAuth(auth), mail.WithUsername(st.Username), mail.WithPassword(st.Password))
	}
	client, err := mail.NewClient(st.Host, opts...)
	if err != nil {
		return fmt.Errorf("%w: smtp client: %v", errPermanent, err)
	}
	if err := client.DialAndSendWithContext(ctx, msg); err != nil {
		return fmt.Errorf("send email: %w", err)
	}
	return nil
}

// domainOf returns the domain of an address ("billing@example.com" -> "example.com"), for
// Message-IDs.
func domainOf(addr string) string {
	addr = strings.TrimSuffix(strings.TrimSpace(addr), ">")
	if i := strings.LastIndexByte(addr, '@'); i >= 0 && i < len(addr)-1 {
		return addr[i+1:]
	}
	return "billingd.invalid"
}

// deliverNotificationWorker delivers one outbox row and records the result.
type deliverNotificationWorker struct {
	river.WorkerDefaults[DeliverNotificationArgs]
	d        *Deps
	notifier *notifier
}

// loadNotificationQuery reads a notification with what decides whether it is still worth
// sending: a recovery or reminder whose recovery is no longer open asks for money not due.
const loadNotificationQuery = `
select n.channel, n.kind, n.recipient, n.subject, n.body, n.payload, n.dedupe_key, n.status, n.created_at,
       n.kind in ('recovery', 'reminder') and coalesce(r.status <> 'open', true)
from billing.notifications n
left join billing.recoveries r on r.charge_id = n.charge_id
where n.id = $1`

const (
	markSentQuery = `
update billing.notifications set status = 'sent', sent_at = now(), attempts = attempts + 1, last_error = null
where id = $1 and status = 'pending'`
	markSkippedQuery = `
update billing.notifications set status = 'skipped', last_error = $2
where id = $1 and status = 'pending'`
	markTryFailedQuery = `
update billing.notifications
set attempts = attempts + 1, last_error = $2, status = case when $3 then 'failed' else status end
where id = $1 and status = 'pending'`
)

// Work sends the notification unless it was sent already or its charge was settled meanwhile,
// then records the outcome. A failed send is retried by River until the last attempt, which
// marks the notification failed.
func (w *deliverNotificationWorker) Work(ctx context.Context, job *river.Job[DeliverNotificationArgs]) error {
	id := job.Args.NotificationID
	log := w.d.Logger.With("notification_id", id, "job_id", job.ID)
	n := outboxEntry{ID: id}
	var payload []byte
	err := w.d.Pool.QueryRow(ctx, loadNotificationQuery, id).Scan(&n.Channel, &n.Kind, &n.Recipient,
		&n.Subject, &n.Body, &payload, &n.DedupeKey, &n.Status, &n.CreatedAt, &n.Settled)
	if errors.Is(err, pgx.ErrNoRows) {
		return river.JobCancel(fmt.Errorf("notification %d does not exist", id))
	}
	if err != nil {
		return fmt.Errorf("load notification %d: %w", id, err)
	}
	if n.Status != "pending" {
		return nil // sent (or given up) by an earlier run
	}
	if err := json.Unmarshal(payload, &n.Payload); err != nil {
		return river.JobCancel(fmt.Errorf("notification %d payload: %w", id, err))
	}
	if n.Settled {
		if _, err := w.d.Pool.Exec(ctx, markSkippedQuery, id, "the charge was settled before delivery"); err != nil {
			return fmt.Errorf("skip notification %d: %w", id, err)
		}
		metrics.Notifications.WithLabelValues(n.Channel, "skipped").Inc()
		log.Info("notification skipped: charge settled", "channel", n.Channel)
		return nil
	}

	sendErr := w.notifier.send(ctx, n)
	if sendErr == nil {
		if _, err := w.d.Pool.Exec(ctx, markSentQuery, id); err != nil {
			// Sent but not recorded: the retry sends again, and the receiver drops the repeat by id.
			return fmt.Errorf("record notification %d as sent: %w", id, err)
		}
		metrics.Notifications.WithLabelValues(n.Channel, "sent").Inc()
		log.Info("notification sent", "channel", n.Channel, "kind", n.Kind)
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	permanent := errors.Is(sendErr, errPermanent)
	last := permanent || job.Attempt >= job.MaxAttempts
	if _, err := w.d.Pool.Exec(ctx, markTryFailedQuery, id, truncate(sendErr.Error(), 500), last); err != nil {
		return errors.Join(sendErr, fmt.Errorf("record notification %d failure: %w", id, err))
	}
	result := "retry"
	if last {
		result = "failed"
	}
	metrics.Notifications.WithLabelValues(n.Channel, result).Inc()
	log.Warn("notification not delivered", "channel", n.Channel, "attempt", job.Attempt, "final", last, "error", sendErr)
	if permanent {
		return river.JobCancel(sendErr)
	}
	return sendErr
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
