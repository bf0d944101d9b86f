package jobs

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/billingd/billingd/internal/config"
)

// DeclineClass says what billingd does after a card decline (an HTTP 402 from Stripe).
type DeclineClass string

const (
	// NeverRetry declines go straight to recovery: retrying cannot succeed (the card is lost,
	// stolen, closed or wrong), is forbidden by the card networks, or needs the customer
	// (authentication, a new card).
	NeverRetry DeclineClass = "never_retry"
	// RetryLater declines may succeed another day (insufficient funds, a limit reached, an
	// unexplained decline): retried off-session on the policy's calendar.
	RetryLater DeclineClass = "retry_later"
	// RetrySoon declines are the issuer's or the network's momentary trouble: retried on the
	// quick calendar first.
	RetrySoon DeclineClass = "retry_soon"
)

// DeclinePolicy decides what follows a decline. It is data, so that a payments team can read
// and change it: Codes maps Stripe decline codes (and error codes, for errors that carry no
// decline code) to a class; a code not listed gets Default.
//
// Every decline starts recovery (the customer gets a link to pay on-session); a retryable
// decline is also retried automatically, at most MaxRetries times per charge (Stripe
// recommends at most eight) and only while the card has had fewer than MaxCardDeclines
// declines in CardWindow (the card networks allow about fifteen reattempts per card in
// thirty days; Visa none at all for its never-approve codes, which are NeverRetry here).
type DeclinePolicy struct {
	Codes   map[string]DeclineClass
	Default DeclineClass

	// Calendar is the wait before each automatic retry of a RetryLater decline: the first
	// retry waits Calendar[0], the second Calendar[1]; past its end the last entry repeats.
	Calendar []time.Duration
	// QuickCalendar is the same for RetrySoon declines.
	QuickCalendar []time.Duration

	MaxRetries      int
	MaxCardDeclines int
	CardWindow      time.Duration
}

// DefaultDeclinePolicy is billingd's decline policy. Unknown codes are not retried: a code
// that Stripe adds later may be one the networks forbid retrying, and recovery is always safe.
func DefaultDeclinePolicy() DeclinePolicy {
	const day = 24 * time.Hour
	return DeclinePolicy{
		Codes: map[string]DeclineClass{
			// The card is gone or was never valid: the networks' never-approve codes.
			"lost_card":                         NeverRetry,
			"stolen_card":                       NeverRetry,
			"pickup_card":                       NeverRetry,
			"restricted_card":                   NeverRetry,
			"incorrect_number":                  NeverRetry,
			"invalid_number":                    NeverRetry,
			"invalid_account":                   NeverRetry,
			"expired_card":                      NeverRetry,
			"new_account_information_available": NeverRetry,
			// The customer withdrew the authority to charge this card.
			"revocation_of_authorization":      NeverRetry,
			"revocation_of_all_authorizations": NeverRetry,
			"stop_payment_order":               NeverRetry,
			// Fraud: never retry, never argue.
			"fraudulent":              NeverRetry,
			"highest_risk_level":      NeverRetry,
			"merchant_blacklist":      NeverRetry,
			"security_violation":      NeverRetry,
			"do_not_try_again":        NeverRetry,
			"card_not_supported":      NeverRetry,
			"currency_not_supported":  NeverRetry,
			"transaction_not_allowed": NeverRetry,
			"not_permitted":           NeverRetry,
			"service_not_allowed":     NeverRetry,
			"invalid_amount":          NeverRetry,
			// Only the customer can fix these, on-session.
			"authentication_required":        NeverRetry,
			"incorrect_cvc":                  NeverRetry,
			"invalid_cvc":                    NeverRetry,
			"incorrect_pin":                  NeverRetry,
			"invalid_pin":                    NeverRetry,
			"pin_try_exceeded":               NeverRetry,
			"offline_pin_required":           NeverRetry,
			"online_or_offline_pin_required": NeverRetry,
			"incorrect_zip":                  NeverRetry,
			"incorrect_address":              NeverRetry,
			"call_issuer":                    NeverRetry,
			"duplicate_transaction":          NeverRetry,
			"testmode_decline":               NeverRetry,
			"live_mode_test_card":            NeverRetry,

			// May pass another day.
			"insufficient_funds":              RetryLater,
			"card_velocity_exceeded":          RetryLater,
			"withdrawal_count_limit_exceeded": RetryLater,
			// Unexplained declines: Stripe's Smart Retries retry them, and so do we, within
			// the same limits. Recovery runs alongside, so the customer can still act.
			"generic_decline": RetryLater,
			"do_not_honor":    RetryLater,
			"no_action_taken": RetryLater,
			"approve_with_id": RetryLater,
			"card_declined":   RetryLater, // the error code of a decline without a decline code

			// Momentary trouble at the issuer or the network.
			"processing_error":     RetrySoon,
			"try_again_later":      RetrySoon,
			"issuer_not_available": RetrySoon,
			"reenter_transaction":  RetrySoon,
		},
		Default:         NeverRetry,
		Calendar:        []time.Duration{1 * day, 2 * day, 2 * day, 3 * day, 3 * day, 3 * day, 4 * day, 4 * day},
		QuickCalendar:   []time.Duration{1 * time.Hour, 6 * time.Hour, 1 * day, 2 * day, 3 * day, 3 * day, 4 * day, 4 * day},
		MaxRetries:      8,
		MaxCardDeclines: 15,
		CardWindow:      30 * day,
	}
}

// DeclinePolicyFromConfig returns DefaultDeclinePolicy with the settings of cfg applied: the
// retry limits, the calendars, and codes moved between classes. A nil cfg gives the default.
func DeclinePolicyFromConfig(cfg *config.Config) (DeclinePolicy, error) {
	p := DefaultDeclinePolicy()
	if cfg == nil {
		return p, nil
	}
	p.MaxRetries = cfg.DeclineMaxRetries
	p.MaxCardDeclines = cfg.DeclineCardLimit
	var err error
	if p.Calendar, err = config.ParseDurations(cfg.RetryCalendar); err != nil {
		return p, fmt.Errorf("retry calendar: %w", err)
	}
	if p.QuickCalendar, err = config.ParseDurations(cfg.RetryQuickCalendar); err != nil {
		return p, fmt.Errorf("quick retry calendar: %w", err)
	}
	for class, list := range map[DeclineClass]string{
		NeverRetry: cfg.DeclineNeverRetry, RetryLater: cfg.DeclineRetryLater, RetrySoon: cfg.DeclineRetrySoon,
	} {
		for _, code := range config.SplitList(list) {
			p.Codes[code] = class
		}
	}
	return p, p.Validate()
}

// Decline is what Stripe said about a declined charge, and what billingd knows of its history.
type Decline struct {
	Code        string // error.code, e.g. card_declined, expired_card, authentication_required
	DeclineCode string // error.decline_code, e.g. insufficient_funds; empty when Stripe gave none

	// ChargeDeclines counts this charge's declined attempts, this one included.
	ChargeDeclines int
	// CardDeclines counts the declines of this card (any charge) within CardWindow, this one
	// included.
	CardDeclines int
	// At is when the decline happened; the next attempt is scheduled from it.
	At time.Time
}

// DeclineDecision is the policy's answer.
type DeclineDecision struct {
	Class DeclineClass
	// Retry says whether to retry automatically at NextAttemptAt. Recovery starts either way.
	Retry         bool
	NextAttemptAt time.Time
	// Reason says why, for billing.charges.status_reason and the recovery.
	Reason string
}

// Classify returns the class of a decline. The decline code decides when there is one (an
// unlisted one gets Default), the error code when there is none; an error code listed as
// NeverRetry wins over a retryable decline code, so that, for example, an
// authentication_required error is never retried whatever its decline code.
func (p DeclinePolicy) Classify(code, declineCode string) DeclineClass {
	byCode, codeKnown := p.Codes[code]
	if codeKnown && byCode == NeverRetry {
		return NeverRetry
	}
	if declineCode != "" {
		if c, ok := p.Codes[declineCode]; ok {
			return c
		}
		return p.Default
	}
	if codeKnown {
		return byCode
	}
	return p.Default
}

// Decide applies the policy to a decline. It is a pure function of its inputs.
func (p DeclinePolicy) Decide(d Decline) DeclineDecision {
	class := p.Classify(d.Code, d.DeclineCode)
	what := d.DeclineCode
	if what == "" {
		what = d.Code
	}
	if what == "" {
		what = "unspecified"
	}
	dec := DeclineDecision{Class: class}
	switch {
	case class == NeverRetry:
		dec.Reason = fmt.Sprintf("declined (%s): not retried automatically", what)
	case d.ChargeDeclines > p.MaxRetries:
		dec.Reason = fmt.Sprintf("declined (%s): %d automatic retries spent", what, p.MaxRetries)
	case d.CardDeclines >= p.MaxCardDeclines:
		dec.Reason = fmt.Sprintf("declined (%s): card declined %d times in %s, the card networks' limit",
			what, d.CardDeclines, formatDays(p.CardWindow))
	default:
		cal := p.Calendar
		if class == RetrySoon {
			cal = p.QuickCalendar
		}
		wait := calendarStep(cal, d.ChargeDeclines)
		dec.Retry = true
		dec.NextAttemptAt = d.At.Add(wait)
		dec.Reason = fmt.Sprintf("declined (%s): retry %d of %d scheduled", what, d.ChargeDeclines, p.MaxRetries)
	}
	return dec
}

// calendarStep is the wait before retry n (1-based); past the calendar's end its last step
// repeats, and an empty calendar waits a day.
func calendarStep(cal []time.Duration, n int) time.Duration {
	if len(cal) == 0 {
		return 24 * time.Hour
	}
	return cal[min(max(n, 1), len(cal))-1]
}

func formatDays(d time.Duration) string {
	if d%(24*time.Hour) == 0 {
		return fmt.Sprintf("%d days", d/(24*time.Hour))
	}
	return d.String()
}

// Validate reports a policy that could retry against the networks' rules or never stop.
func (p DeclinePolicy) Validate() error {
	var problems []string
	if p.MaxRetries < 0 || p.MaxRetries > 8 {
		problems = append(problems, fmt.Sprintf("max retries %d must be between 0 and 8 (Stripe's advice)", p.MaxRetries))
	}
	if p.MaxCardDeclines < 1 || p.MaxCardDeclines > 15 {
		problems = append(problems, fmt.Sprintf("card decline limit %d must be between 1 and 15 (card networks)", p.MaxCardDeclines))
	}
	if p.CardWindow < 30*24*time.Hour {
		problems = append(problems, "card window must be at least 30 days")
	}
	for name, cal := range map[string][]time.Duration{"calendar": p.Calendar, "quick calendar": p.QuickCalendar} {
		if len(cal) == 0 {
			problems = append(problems, name+" is empty")
		}
		if slices.ContainsFunc(cal, func(d time.Duration) bool { return d < time.Minute }) {
			problems = append(problems, name+" has a step under a minute")
		}
	}
	switch p.Default {
	case NeverRetry, RetryLater, RetrySoon:
	default:
		problems = append(problems, fmt.Sprintf("default class %q is unknown", p.Default))
	}
	for code, c := range p.Codes {
		switch c {
		case NeverRetry, RetryLater, RetrySoon:
		default:
			problems = append(problems, fmt.Sprintf("code %s has unknown class %q", code, c))
		}
	}
	if len(problems) > 0 {
		slices.Sort(problems)
		return fmt.Errorf("decline policy: %s", strings.Join(problems, "; "))
	}
	return nil
}
