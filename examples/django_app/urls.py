from django.urls import path

from . import views

urlpatterns = [
    path("chat", views.chat),
    path("debug/producer-calls", views.debug_producer_calls),
]
