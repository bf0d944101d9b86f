package jobs

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/internal/money"
)

// Notification channels and kinds, as stored in billing.notifications.
const (
	channelEmail   = "email"
	channelWebhook = "webhook"

	kindRecovery = "recovery"
	kindReminder = "reminder"
)

// Event types of the JSON notifications POSTed to the host application.
const (
	// EventRecoveryRequired tells the application that a charge failed off-session and the
	// customer must pay through the link.
	EventRecoveryRequired = "recovery.payment_required"
	// EventRecoveryReminder repeats it while the charge is unpaid.
	EventRecoveryReminder = "recovery.reminder"
)

// recoveryNotice is what a recovery notification says, whatever its channel.
type recoveryNotice struct {
	ChargeID    int64
	Round       int
	Reminder    int // 0 for the first notification, then 1, 2, ...
	CustomerID  int64
	CustomerRef string
	Email       string // empty: the customer has no email address
	Amount      int64
	Currency    string
	Description string
	Reason      string
	Link        string    // <public-url>/recover/<token>
	PayBy       time.Time // end of the recovery window
}

// outboxRow is one row of billing.notifications to insert.
type outboxRow struct {
	CustomerID int64
	ChargeID   int64
	Channel    string
	Kind       string
	Recipient  string
	Subject    string
	Body       string
	Payload    map[string]any
	DedupeKey  string
}

// recoveryLink returns the customer's link for a recovery token: it leads through billingd,
// which sends the customer to the open Checkout Session or makes a fresh one.
func recoveryLink(cfg *config.Config, token string) string {
	return strings.TrimRight(cfg.PublicURL, "/") + "/recover/" + token
}

// composeRecovery writes the notifications of n for every channel that is configured: an email
// when SMTP is set up and the customer has an address, a signed POST when the application's URL
// is set. It returns none when neither applies; the link is still in the database.
func composeRecovery(cfg *config.Config, n recoveryNotice) ([]outboxRow, error) {
	amount, err := money.Format(n.Amount, n.Currency)
	if err != nil {
		return nil, fmt.Errorf("notify charge %d: %w", n.ChargeID, err)
	}
	decimal, err := money.Decimal(n.Amount, n.Currency)
	if err != nil {
		return nil, fmt.Errorf("notify charge %d: %w", n.ChargeID, err)
	}
	kind, event := kindRecovery, EventRecoveryRequired
	subject := fmt.Sprintf("Payment needed: %s for %s", amount, n.Description)
	key := fmt.Sprintf("recovery:%d:%d", n.ChargeID, n.Round)
	if n.Reminder > 0 {
		kind, event = kindReminder, EventRecoveryReminder
		subject = "Reminder: " + subject
		key = fmt.Sprintf("reminder:%d:%d:%d", n.ChargeID, n.Round, n.Reminder)
	}
	payBy := n.PayBy.UTC().Format("2 January 2006")
	body := fmt.Sprintf(`Hello,

We could not collect %s for %q from your saved payment method.

Please pay here (you may use another card, which will then be used for future payments):
%s

The link stays valid until %s.

This message was sent automatically; reply to reach us.
`, amount, n.Description, n.Link, payBy)
	if n.Reminder > 0 {
		body = fmt.Sprintf(`Hello,

%s for %q is still unpaid.

Please pay here (you may use another card, which will then be used for future payments):
%s

The link stays valid until %s.

This message was sent automatically; reply to reach us.
`, amount, n.Description, n.Link, payBy)
	}

	var rows []outboxRow
	if cfg.SMTPURL != "" && n.Email != "" {
		rows = append(rows, outboxRow{
			CustomerID: n.CustomerID, ChargeID: n.ChargeID, Channel: channelEmail, Kind: kind,
			Recipient: n.Email, Subject: subject, Body: body, Payload: map[string]any{},
			DedupeKey: key + ":" + channelEmail,
		})
	}
	if cfg.NotifyURL != "" {
		rows = append(rows, outboxRow{
			CustomerID: n.CustomerID, ChargeID: n.ChargeID, Channel: channelWebhook, Kind: kind,
			Recipient: n.CustomerRef, Subject: subject, Body: body,
			Payload: map[string]any{
				"type":           event,
				"customer_ref":   n.CustomerRef,
				"charge_id":      n.ChargeID,
				"amount":         n.Amount,
				"currency":       n.Currency,
				"amount_decimal": decimal,
				"amount_display": amount,
				"description":    n.Description,
				"reason":         n.Reason,
				"url":            n.Link,
				"pay_by":         n.PayBy.UTC().Format(time.RFC3339),
				"reminder":       n.Reminder,
			},
			DedupeKey: key + ":" + channelWebhook,
		})
	}
	return rows, nil
}

// insertOutboxQuery writes a notification once: a second write with the same dedupe_key (a
// job that runs twice) inserts nothing and returns no row.
const insertOutboxQuery = `
insert into billing.notifications (customer_id, charge_id, channel, kind, recipient, subject, body, payload, dedupe_key)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
on conflict (dedupe_key) do nothing
returning id`

// insertOutboxTx writes rows into billing.notifications and a deliver_notification job for each
// row that is new, in the caller's transaction. It returns how many were new.
func insertOutboxTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], rows []outboxRow) (int, error) {
	var jobs []river.InsertManyParams
	for _, r := range rows {
		payload, err := json.Marshal(r.Payload)
		if err != nil {
			return 0, fmt.Errorf("notification payload: %w", err)
		}
		var id int64
		err = tx.QueryRow(ctx, insertOutboxQuery, r.CustomerID, nullID(r.ChargeID), r.Channel, r.Kind,
			r.Recipient, r.Subject, r.Body, payload, r.DedupeKey).Scan(&id)
		if err == pgx.ErrNoRows {
			continue // written before
		}
		if err != nil {
			return 0, fmt.Errorf("insert notification %s: %w", r.DedupeKey, err)
		}
		jobs = append(jobs, river.InsertManyParams{Args: DeliverNotificationArgs{NotificationID: id}})
	}
	if len(jobs) == 0 {
		return 0, nil
	}
	if _, err := client.InsertManyTx(ctx, tx, jobs); err != nil {
		return 0, fmt.Errorf("insert deliver_notification jobs: %w", err)
	}
	return len(jobs), nil
}

func nullID(id int64) *int64 {
	if id == 0 {
		return nil
	}
	return &id
}
